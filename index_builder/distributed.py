"""Feature extraction over many processes, GPUs and machines through torch.distributed.

Launch the ordinary builder under torchrun; it notices (``WORLD_SIZE`` > 1) and shards::

    torchrun --standalone --nproc_per_node 4 -m index_builder --source ... --out ...
    torchrun --nnodes 2 --node_rank N --rdzv_endpoint HOST:29400 --nproc_per_node 8 \\
        --no-python advguard build --source ... --out ...

Every rank lists the source itself (the listing is deterministic, and ranks check that they all
see the same one). Rank 0 decides which chunks still need work (those not already on its disk:
a rerun resumes) and hands them out round-robin; each rank extracts its chunks with the same
``extract_features`` as a single process, on its own GPU (NCCL) or on CPU (gloo), then sends them
to rank 0, which writes them into its chunk store. Rank 0 then goes on exactly as the
single-process build does (processing, index, calibration, bundle) through
``build_bundle(..., extractor=...)``; the other ranks exit once their chunks are delivered. Only
rank 0 needs the output directory; the other ranks keep their chunks in
``<work-dir>/<source>.rank<r>`` until they are delivered.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from app.core.errors import SourceError
from app.core.features import FeatureNetwork
from app.core.models import PRESETS, describe_architecture, load_model
from index_builder.build import BuildReport, build_bundle, resolve_detector, second_pass_entries
from index_builder.config import BuildConfig, check_config
from index_builder.extract import (
    ChunkStore,
    ExtractionReport,
    _ChunkBuffer,
    check_fingerprint,
    extract_features,
)
from index_builder.sources import Entry, ImageSource, open_source

DEFAULT_TIMEOUT_S = 4 * 3600.0  # ranks wait for each other's shards; ILSVRC shards take hours


def launched_by_torchrun() -> bool:
    """True inside a torchrun (or torch.distributed.run) world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str

    def log(self, message: str) -> None:
        print(f"advguard build [rank {self.rank}/{self.world_size}]: {message}", file=sys.stderr)


def init(config: BuildConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> Rank:
    """Join the process group: NCCL with one GPU per local rank, else gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = config.device is None or config.device.startswith("cuda")
    if wants_cuda and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", config.device or "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


class _ShardStore(ChunkStore):
    """A chunk store in which only this rank's chunks can be pending."""

    def __init__(
        self, root: Path, total: int, chunk_size: int, layers: list[str], mine: set[int]
    ) -> None:
        super().__init__(root, total, chunk_size, layers)
        self.mine = mine

    def is_done(self, chunk: int) -> bool:
        return chunk not in self.mine or super().is_done(chunk)


def _chunk_arrays(store: ChunkStore, chunk: int) -> dict[str, np.ndarray]:
    names = ["ok", "predictions", *(f"features_{layer}" for layer in store.layers)]
    return {name: np.array(store.load(chunk, name)) for name in names}


def _write_chunk(
    store: ChunkStore, chunk: int, arrays: dict[str, np.ndarray], reasons: dict[int, str]
) -> None:
    span = store.span(chunk)
    buffer = _ChunkBuffer(span.start, len(span), done=len(span), reasons=reasons)
    buffer.ok = arrays["ok"]
    buffer.predictions = arrays["predictions"]
    buffer.features = {layer: arrays[f"features_{layer}"] for layer in store.layers}
    if buffer.ok.shape[0] != len(span):
        raise SourceError(f"chunk {chunk} arrived with {buffer.ok.shape[0]} rows, not {len(span)}")
    store.write(chunk, buffer)


def _object_device(ctx: Rank) -> torch.device | None:
    return torch.device(ctx.device) if ctx.backend == "nccl" else None


def _send(ctx: Rank, payload: object) -> None:
    dist.send_object_list([payload], dst=0, device=_object_device(ctx))


def _receive(ctx: Rank, source_rank: int) -> object:
    box: list[object] = [None]
    dist.recv_object_list(box, src=source_rank, device=_object_device(ctx))
    return box[0]


def extract_sharded(
    ctx: Rank,
    config: BuildConfig,
    network: FeatureNetwork,
    source: ImageSource,
    entries: list[Entry],
    work_root: Path,
    fingerprint: dict[str, object] | None,
    progress: bool,
    on_chunk_written: Callable[[int], None] | None = None,
    second_pass: np.ndarray | None = None,
) -> tuple[ChunkStore, ExtractionReport] | None:
    """One source's extraction on every rank; rank 0 returns the complete store, others None:
    the plan (rank 0's pending chunks) shared → each rank extracts its share → the other ranks
    send theirs to rank 0, which writes them into its store.

    ``fingerprint`` is rank 0's (the other ranks receive it and check their own listing).
    """
    started = time.perf_counter()
    store = ChunkStore(work_root, len(entries), config.chunk_size, list(network.layers))
    shared_fingerprint, pending = _shared_plan(ctx, store, work_root, fingerprint, entries)
    mine = pending[ctx.rank :: ctx.world_size]
    root = work_root if ctx.rank == 0 else work_root.with_name(f"{work_root.name}.rank{ctx.rank}")
    if ctx.rank != 0:
        check_fingerprint(root, shared_fingerprint)
    shard = _ShardStore(root, len(entries), config.chunk_size, list(network.layers), set(mine))
    preset = PRESETS[describe_architecture(config.arch).preset]
    report = extract_features(
        network,
        source,
        entries,
        shard,
        preset,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        progress=progress and ctx.rank == 0,
        on_chunk_written=on_chunk_written if ctx.rank == 0 else None,
        second_pass=second_pass,
    )
    ctx.log(f"extracted {len(mine)} of {len(pending)} pending chunks ({report.images} images)")
    if ctx.rank != 0:
        for chunk in mine:
            _send(ctx, (chunk, _chunk_arrays(shard, chunk), shard.reasons(chunk)))
        _send(ctx, report)
        shutil.rmtree(root, ignore_errors=True)
        return None
    reports = [report, *_receive_shares(ctx, store, pending, on_chunk_written)]
    missing = [c for c in range(store.n_chunks) if not store.is_done(c)]
    if missing:
        raise SourceError(f"chunks {missing} are missing after the distributed extraction")
    total = ExtractionReport(
        images=sum(r.images for r in reports),
        skipped=sum(r.skipped for r in reports),
        chunks_computed=sum(r.chunks_computed for r in reports),
        chunks_reused=store.n_chunks - len(pending),
        seconds=time.perf_counter() - started,
    )
    return store, total


def _shared_plan(
    ctx: Rank,
    store: ChunkStore,
    work_root: Path,
    fingerprint: dict[str, object] | None,
    entries: list[Entry],
) -> tuple[dict[str, object], list[int]]:
    """Rank 0's fingerprint and pending chunks, on every rank: rank 0 checks its work folder's
    fingerprint and lists what is not done yet; the others check their listing against it."""
    plan: list[object] = [None, None]
    if ctx.rank == 0:
        assert fingerprint is not None
        check_fingerprint(work_root, fingerprint)
        plan = [fingerprint, [c for c in range(store.n_chunks) if not store.is_done(c)]]
    dist.broadcast_object_list(plan, src=0, device=_object_device(ctx))
    shared_fingerprint, pending = plan
    assert isinstance(shared_fingerprint, dict) and isinstance(pending, list)
    if ctx.rank != 0:
        _check_same_listing(ctx, shared_fingerprint, entries)
    return shared_fingerprint, pending


def _receive_shares(
    ctx: Rank,
    store: ChunkStore,
    pending: list[int],
    on_chunk_written: Callable[[int], None] | None,
) -> list[ExtractionReport]:
    """On rank 0: every other rank's chunks, in the order they were dealt, written into
    ``store``; then their reports."""
    for position, chunk in enumerate(pending):
        owner = position % ctx.world_size
        if owner == 0:
            continue
        received = _receive(ctx, owner)
        assert isinstance(received, tuple)
        got_chunk, arrays, reasons = received
        if got_chunk != chunk:
            raise SourceError(f"rank {owner} sent chunk {got_chunk}, expected {chunk}")
        _write_chunk(store, chunk, arrays, reasons)
        if on_chunk_written is not None:
            on_chunk_written(chunk)
    reports = []
    for other in range(1, ctx.world_size):
        received = _receive(ctx, other)
        assert isinstance(received, ExtractionReport)
        reports.append(received)
    return reports


def _check_same_listing(ctx: Rank, fingerprint: dict[str, object], entries: list[Entry]) -> None:
    import hashlib

    digest = hashlib.sha256("\n".join(e.key for e in entries).encode()).hexdigest()
    if fingerprint.get("entries") != len(entries) or fingerprint.get("entries_sha256") != digest:
        raise SourceError(
            f"rank {ctx.rank} lists {len(entries)} images that differ from rank 0's "
            f"{fingerprint.get('entries')}: every node must see the same source"
        )


def _network(config: BuildConfig, num_classes: int) -> FeatureNetwork:
    """The layers rank 0's plan extracts (``plan_build``): those the detector's statistics read."""
    info = describe_architecture(config.arch)
    model = load_model(config.arch, config.weights, num_classes)
    _, _, layers = resolve_detector(config, model)
    device = torch.device(config.device or "cpu")
    return FeatureNetwork(model, layers, PRESETS[info.preset]).to(device).eval()


def _follow(ctx: Rank, config: BuildConfig) -> None:
    """A rank other than 0: the extractions ``build_bundle`` runs on rank 0, in the same order."""
    source = open_source(config.source, config.split)
    listing = source.listing(config.per_class_limit)
    network = _network(config, len(listing.classes))
    work_dir = config.work_dir or config.out.with_name(config.out.name + ".work")
    entries = listing.entries
    second_pass = second_pass_entries(config, entries)  # rank 0's, from the same listing
    extract_sharded(
        ctx, config, network, source, entries, work_dir / "source", None, False, None, second_pass
    )
    if config.calibration_source is not None:
        cal_source = open_source(config.calibration_source, config.calibration_split)
        cal_entries = cal_source.listing().entries
        extract_sharded(
            ctx, config, network, cal_source, cal_entries, work_dir / "calibration", None, False
        )


def build_bundle_distributed(
    config: BuildConfig, progress: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S
) -> BuildReport | None:
    """The builder on every rank of a torchrun world; rank 0 returns the report, others None."""
    check_config(config)  # on every rank, before the world forms: each refuses on its own
    ctx = init(config, timeout_s)
    config = replace(config, device=ctx.device)
    try:
        if ctx.rank != 0:
            _follow(ctx, config)
            return None

        def extractor(
            cfg: BuildConfig,
            network: FeatureNetwork,
            source: ImageSource,
            entries: list[Entry],
            work_root: Path,
            fingerprint: dict[str, object],
            show: bool,
            on_chunk_written: Callable[[int], None] | None,
            second_pass: np.ndarray | None,
        ) -> tuple[ChunkStore, ExtractionReport]:
            result = extract_sharded(
                ctx,
                cfg,
                network,
                source,
                entries,
                work_root,
                fingerprint,
                show,
                on_chunk_written,
                second_pass,
            )
            assert result is not None
            return result

        report = build_bundle(config, progress=progress, extractor=extractor)
        ctx.log(f"bundle written to {report.bundle}")
        return report
    finally:
        dist.destroy_process_group()
