"""Streaming feature extraction with chunked, memory-mapped, resumable output.

Images flow through a DataLoader (decode + preprocessing in worker processes) into the one
feature network. Results land in fixed-size chunks of source positions; a chunk is written to
disk (one ``.npy`` per array, atomically renamed) as soon as all its positions are done, so a
killed build resumes from the chunks already on disk and ILSVRC-sized feature sets never have to
fit in memory.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from app.core.errors import SourceError, StaleWorkDirError
from app.core.features import BatchFeatures, FeatureNetwork, image_to_pixels, infer_batch
from app.core.images import ImageDecodeError, decode_image
from app.core.models import PreprocessingPreset
from index_builder.sources import Entry, ImageSource

Sample = tuple[int, torch.Tensor | str]  # a position's pixels, or why they could not be read

UNREADABLE_FILE = "unreadable.json"  # a chunk's {offset: reason} for its unreadable images
# a chunk written before the reasons were kept (a work directory resumed across versions)
REASON_NOT_KEPT = "unreadable (the reason was not kept by the build that read it)"


@dataclass(frozen=True)
class Unreadable:
    """An image the builder could not use, and why: the bundle lists them (``skipped.json``)."""

    image: str  # the entry's key, "<class>/<file>"
    reason: str


class _SourceDataset(IterableDataset[Sample]):
    """Yields (position, pixels or why the image is unreadable), sharded across workers."""

    def __init__(
        self,
        source: ImageSource,
        entries: list[Entry],
        positions: list[int],
        preset: PreprocessingPreset,
    ) -> None:
        self.source = source
        self.entries = entries
        self.positions = positions
        self.preset = preset

    def _pixels(self, data: bytes) -> torch.Tensor | str:
        try:
            return image_to_pixels(decode_image(data, min_size=self.preset.resize), self.preset)
        except ImageDecodeError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"cannot decode image: {type(exc).__name__}: {exc}"

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.positions[worker::workers]
        if not self.source.streaming:
            for position in mine:
                try:
                    data = self.source.read(self.entries[position])
                except OSError as exc:
                    yield position, f"cannot read: {exc}"
                    continue
                yield position, self._pixels(data)
            return
        by_member = {self.entries[p].member: p for p in mine}
        seen: set[int] = set()
        for member, data in self.source.stream(set(by_member)):
            seen.add(by_member[member])
            yield by_member[member], self._pixels(data)
        for position in mine:  # members the archive stream did not yield count as unreadable
            if position not in seen:
                yield position, "cannot read: not found in the archive"


def _collate(
    samples: list[Sample],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch -> (positions read, their pixels stacked, (position, reason) of the others)."""
    ok = [(p, t) for p, t in samples if isinstance(t, torch.Tensor)]
    failed = [(p, t) for p, t in samples if isinstance(t, str)]
    pixels = torch.stack([t for _, t in ok]) if ok else None
    return [p for p, _ in ok], pixels, failed


@dataclass
class _ChunkBuffer:
    start: int
    length: int
    features: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ok: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    done: int = 0
    reasons: dict[int, str] = field(default_factory=dict)  # offset -> why it is unreadable


class _ChunkAssembler:
    """Rows arrive from the loader by position, a batch at a time; a chunk is written to the
    store once every one of its positions is in, computed or unreadable (``fail``: its row
    stays zero, ``ok`` false)."""

    def __init__(self, store: ChunkStore, on_written: Callable[[int], None] | None) -> None:
        self.store = store
        self.on_written = on_written
        self.buffers: dict[int, _ChunkBuffer] = {}
        self.written = 0

    @property
    def incomplete(self) -> list[int]:
        return sorted(self.buffers)

    def add(self, positions: list[int], batch: BatchFeatures) -> None:
        for row, position in enumerate(positions):
            buffer = self._buffer(position)
            offset = position - buffer.start
            for layer, values in batch.features.items():
                if layer not in buffer.features:
                    buffer.features[layer] = np.zeros(
                        (buffer.length, values.shape[1]), dtype=np.float32
                    )
                buffer.features[layer][offset] = values[row]
            buffer.predictions[offset] = batch.predictions[row]
            buffer.ok[offset] = True
            self._done(position)

    def fail(self, failed: list[tuple[int, str]]) -> None:
        for position, reason in failed:
            buffer = self._buffer(position)
            buffer.reasons[position - buffer.start] = reason
            self._done(position)

    def _buffer(self, position: int) -> _ChunkBuffer:
        chunk = position // self.store.chunk_size
        if chunk not in self.buffers:
            span = self.store.span(chunk)
            self.buffers[chunk] = _ChunkBuffer(span.start, len(span))
            self.buffers[chunk].ok = np.zeros(len(span), dtype=bool)
            self.buffers[chunk].predictions = np.full(len(span), -1, dtype=np.int64)
        return self.buffers[chunk]

    def _done(self, position: int) -> None:
        chunk = position // self.store.chunk_size
        buffer = self.buffers[chunk]
        buffer.done += 1
        if buffer.done == buffer.length:
            for layer in self.store.layers:  # a chunk of unreadable images still needs arrays
                if layer not in buffer.features:
                    buffer.features[layer] = np.zeros((buffer.length, 0), dtype=np.float32)
            self.store.write(chunk, self.buffers.pop(chunk))
            self.written += 1
            if self.on_written is not None:
                self.on_written(chunk)


@dataclass(frozen=True)
class ExtractionReport:
    images: int
    skipped: int
    chunks_computed: int
    chunks_reused: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class ChunkStore:
    """A directory of completed chunks ``chunk_00000/{ok,predictions,features_<layer>}.npy``."""

    def __init__(self, root: Path, total: int, chunk_size: int, layers: list[str]) -> None:
        self.root = root
        self.total = total
        self.chunk_size = chunk_size
        self.layers = layers

    @property
    def n_chunks(self) -> int:
        return (self.total + self.chunk_size - 1) // self.chunk_size

    def chunk_dir(self, chunk: int) -> Path:
        return self.root / f"chunk_{chunk:05d}"

    def is_done(self, chunk: int) -> bool:
        return (self.chunk_dir(chunk) / "ok.npy").is_file()

    def span(self, chunk: int) -> range:
        start = chunk * self.chunk_size
        return range(start, min(start + self.chunk_size, self.total))

    def write(self, chunk: int, buffer: _ChunkBuffer) -> None:
        final = self.chunk_dir(chunk)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for layer, array in buffer.features.items():
            np.save(tmp / f"features_{layer}.npy", array)
        np.save(tmp / "predictions.npy", buffer.predictions)
        if buffer.reasons:
            (tmp / UNREADABLE_FILE).write_text(json.dumps(buffer.reasons))
        np.save(tmp / "ok.npy", buffer.ok)  # written last: its presence marks the chunk complete
        tmp.rename(final)

    def reasons(self, chunk: int) -> dict[int, str]:
        """The chunk's unreadable images, offset -> why (``write``'s ``unreadable.json``)."""
        path = self.chunk_dir(chunk) / UNREADABLE_FILE
        kept = json.loads(path.read_text()) if path.is_file() else {}
        return {int(offset): str(reason) for offset, reason in kept.items()}

    def unreadable(self, keys: list[str]) -> list[Unreadable]:
        """Every image of the store that could not be read, in source order, with its reason;
        ``keys``: the entries' keys by position."""
        found = []
        for chunk in range(self.n_chunks):
            ok = np.asarray(self.load(chunk, "ok"))
            reasons = self.reasons(chunk)
            start = self.span(chunk).start
            for offset in np.flatnonzero(~ok).tolist():
                found.append(Unreadable(keys[start + offset], reasons.get(offset, REASON_NOT_KEPT)))
        return found

    def load(self, chunk: int, name: str) -> np.ndarray:
        """Memory-mapped view of one array of one chunk."""
        array: np.ndarray = np.load(self.chunk_dir(chunk) / f"{name}.npy", mmap_mode="r")
        return array


def check_fingerprint(root: Path, fingerprint: dict[str, object]) -> None:
    """Refuse to resume chunks written for another source, model or layer set."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fingerprint.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != fingerprint:
            differ = sorted(
                k for k in stored.keys() | fingerprint.keys() if stored.get(k) != fingerprint.get(k)
            )
            raise StaleWorkDirError(
                f"work directory {root} holds chunks of a different build ({', '.join(differ)} "
                f"differ: see {path}); delete it or pass another --work-dir"
            )
    else:
        path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))


def extract_features(
    network: FeatureNetwork,
    source: ImageSource,
    entries: list[Entry],
    store: ChunkStore,
    preset: PreprocessingPreset,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
    second_pass: np.ndarray | None = None,
) -> ExtractionReport:
    """Fill ``store`` with the features of every entry, skipping chunks already on disk.

    ``second_pass`` (a boolean per entry) limits the second passes of a network that reads
    ``flip.logits``, ``median.logits`` or ``jpeg.logits`` to those entries
    (``FeatureNetwork.forward``'s ``second_pass_only``); None: every entry."""
    pending_chunks = [c for c in range(store.n_chunks) if not store.is_done(c)]
    reused = store.n_chunks - len(pending_chunks)
    positions = [p for c in pending_chunks for p in store.span(c)]
    started = time.perf_counter()
    if not positions:
        return ExtractionReport(0, 0, 0, reused, 0.0)
    dataset = _SourceDataset(source, entries, positions, preset)
    # Each worker of a streaming source decompresses the whole archive to reach its share, so
    # more than one only multiplies that cost.
    workers = min(num_workers, len(positions), 1 if source.streaming else num_workers)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    chunks = _ChunkAssembler(store, on_chunk_written)
    images = skipped = 0
    # Redraw often on a terminal, rarely in a log file (CI, docker logs).
    bar = tqdm(
        total=len(positions),
        unit="img",
        desc="features",
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,
    )
    for ok_positions, pixels, failed in loader:
        if pixels is not None:
            only = None if second_pass is None else torch.from_numpy(second_pass[ok_positions])
            chunks.add(ok_positions, infer_batch(network, pixels, only))
        chunks.fail(failed)
        images += len(ok_positions)
        skipped += len(failed)
        bar.update(len(ok_positions) + len(failed))
        bar.set_postfix(skipped=skipped)
    bar.close()
    if chunks.incomplete:
        raise SourceError(f"extraction ended with incomplete chunks {chunks.incomplete}")
    seconds = time.perf_counter() - started
    return ExtractionReport(images, skipped, chunks.written, reused, seconds)
