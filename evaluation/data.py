"""The evaluation's images: a split of a labelled source (CIFAR-10 test), decoded once and cached.

Images are read from the source in place (a tar archive is streamed, never extracted), turned
into pixels with the bundle's own preprocessing (``image_to_pixels``) and cached as uint8
(exact for the 32x32 CIFAR preset, where preprocessing is the identity on 8-bit pixels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.core.features import image_to_pixels
from app.core.images import decode_image
from app.core.models import PreprocessingPreset, file_sha256
from app.core.stateful.hashes import eight_bit as stateful_eight_bit
from index_builder.sources import open_source

# where the query-attack and stateful tools keep their decoded splits (``advguard evaluate``'s
# ``--cache-dir`` / "data" by default: one decode serves them all)
DATA_CACHE = Path(".cache/evaluation/data")


def add_data_cache_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--data-cache`` option of the tools that read ``load_split``'s cache."""
    parser.add_argument(
        "--data-cache",
        type=Path,
        default=DATA_CACHE,
        help="decoded image splits cached here (default: %(default)s)",
    )


@dataclass(frozen=True)
class ImageSplit:
    pixels: np.ndarray  # (n, 3, H, W) uint8
    labels: np.ndarray  # (n,) int64
    keys: list[str]
    classes: list[str]

    def tensor(self, rows: np.ndarray) -> torch.Tensor:
        """Float pixels in [0, 1] of the given rows."""
        return torch.from_numpy(self.pixels[rows].astype(np.float32) / 255.0)


def eight_bit(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] float pixels as the 8-bit image a file holds:
    ``app.core.stateful.hashes.eight_bit``, the conversion the service's fingerprints read."""
    return stateful_eight_bit(pixels)


def source_stamp(source: Path) -> dict[str, object]:
    """Which source this is: its resolved path and, for an archive, its size and the SHA-256 of
    its bytes. Every session's copy of ../shared writes the CIFAR-10 archive again, with a new
    modification time and the same bytes: stamped by its mtime, as it was until 2026-12-06,
    each copy made every cached split, bundle and honest traffic stale (about an hour of
    rebuilding in session 76's two evaluations). A directory is stamped by its own mtime
    (hashing every image would cost what the cache saves; files rewritten inside a class
    folder do not change it)."""
    resolved = source.resolve()
    stat = resolved.stat()
    if resolved.is_dir():
        return {"source": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    # 43 ms for the 19 MB CIFAR-10 archive (2026-12-06), once per cached split or bundle asked
    return {"source": str(resolved), "size": stat.st_size, "sha256": file_sha256(resolved)}


def _cache_key(
    source: Path, split: str | None, preset: PreprocessingPreset, per_class_limit: int | None
) -> str:
    blob = json.dumps(
        {
            **source_stamp(source),
            "split": split,
            "preset": [preset.name, preset.resize, preset.crop],
            "per_class_limit": per_class_limit,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_split(
    source: Path,
    split: str | None,
    preset: PreprocessingPreset,
    cache_dir: Path,
    per_class_limit: int | None = None,
) -> ImageSplit:
    """The images of ``split`` (the first ``per_class_limit`` of each class) in listing order
    (class, then file name), cached on disk."""
    cache = cache_dir / f"split-{_cache_key(source, split, preset, per_class_limit)}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return ImageSplit(
                data["pixels"],
                data["labels"].astype(np.int64),
                [str(k) for k in data["keys"]],
                [str(c) for c in data["classes"]],
            )
    image_source = open_source(source, split)
    listing = image_source.listing(per_class_limit)
    entries = listing.entries
    position = {entry.key: i for i, entry in enumerate(entries)}
    by_member = {entry.member: entry.key for entry in entries if entry.member}
    size = preset.crop
    pixels = np.zeros((len(entries), 3, size, size), dtype=np.uint8)
    seen = np.zeros(len(entries), dtype=bool)

    def store(key: str, data: bytes) -> None:
        tensor = image_to_pixels(decode_image(data, min_size=preset.resize), preset)
        pixels[position[key]] = eight_bit(tensor.numpy())
        seen[position[key]] = True

    if image_source.streaming:
        for member, data in image_source.stream(set(by_member)):
            store(by_member[member], data)
    else:
        for entry in entries:
            store(entry.key, image_source.read(entry))
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} images of {source} could not be read")
    labels = np.array([entry.label for entry in entries], dtype=np.int64)
    keys = [entry.key for entry in entries]
    save_npz(
        cache, pixels=pixels, labels=labels, keys=np.array(keys), classes=np.array(listing.classes)
    )
    return ImageSplit(pixels, labels, keys, list(listing.classes))


def save_npz(path: Path, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Write a cache file whole or not at all: into a temporary file named for this process,
    then renamed over ``path``. Evaluations run side by side build the same caches; a shared
    temporary name let one rename the other's file from under it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
