"""The GPU machine's own CPU beside a busy interpreter thread: what giving the lock back costs.

On an H200 (2026-11-30) the service's screening thread got through ~130 queries/s at 224 px and
its requests waited 170-250 ms in decoding. On two cores here, the same work beside a thread
that runs Python without pause (a saturated event loop) pays for every call that gives the
interpreter lock back (``bench.decode_contention``, ``bench.stateful_cost``), and both paths
were changed to give it back less. This step measures them where the service ran, on the GPU
machine's host, before the service step's figures are read:

- preparing an upload, step by step (``bench.decode_contention``: decode, Pillow's resize and
  crop, the pixel conversion as ``image_to_pixels`` does it and as torchvision's chain did it);
- a screening batch's fingerprints on the worker processes (``bench.stateful_cost``'s
  ``fingerprint_times``), for each count of processes in ``Sizes.host_processes``;

each alone and beside a busy thread. Uploads are the service step's 224 px synthetic JPEGs and
the ImageNet preset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from app.core.features import image_to_pixels
from app.core.images import decode_image
from app.core.models import PRESETS
from app.core.stateful.defaults import default_scheme
from app.core.stateful.schemes import fingerprint_pixels
from app.service.hashing import FingerprintHasher
from bench.common import busy_interpreter
from bench.decode_contention import measure, steps
from bench.gpu.synthetic import jpegs
from bench.stateful_cost import FINGERPRINT_BATCH, SECRET, fingerprint_times

SIDE = 224  # the service step's uploads


def device_prints(pixels: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The window hashes and block means on ``device`` (``device_hashes``, as the service
    computes them beside a GPU model, from the rows of the batch the model read there): how
    many of the screening batches' prints equal the host's bit for bit (``fingerprint_pixels``),
    and their ms per query alone and beside a busy thread."""
    scheme = default_scheme(SECRET)
    hasher = FingerprintHasher(scheme, 0, device)
    identical = 0
    try:
        for start in range(0, len(pixels), FINGERPRINT_BATCH):
            batch = pixels[start : start + FINGERPRINT_BATCH]
            got = hasher.prints(list(torch.stack(batch).to(device)))
            expected = fingerprint_pixels(scheme, torch.stack(batch).numpy())
            same = (got.sketches == expected.sketches).all(axis=1) & (
                got.keys == expected.keys
            ).all(axis=1)
            same &= np.array([a == b for a, b in zip(got.digests, expected.digests, strict=True)])
            identical += int(same.sum())
    finally:
        hasher.close()
    alone = fingerprint_times(pixels, single=False, device=device)
    with busy_interpreter():
        busy = fingerprint_times(pixels, single=False, device=device)
    return {
        "device": str(device),
        "identical": identical,
        "queries": len(pixels),
        "alone_ms": alone["batch_ms"]["mean"],
        "busy_ms": busy["batch_ms"]["mean"],
        "busy_p50_ms": busy["batch_ms"]["p50"],
    }


def run(
    uploads: int,
    rounds: int,
    batches: int,
    processes: tuple[int, ...],
    device: torch.device | None = None,
) -> tuple[dict[str, Any], str]:
    preset = PRESETS["imagenet"]
    data = jpegs(uploads, (SIDE, SIDE), seed=7)
    preparing = measure(steps(data, preset), uploads, rounds)
    pixels = [image_to_pixels(decode_image(item), preset) for item in data]
    wanted = FINGERPRINT_BATCH * batches
    pixels = (pixels * -(-wanted // len(pixels)))[:wanted]  # the uploads again, as needed
    on_device = device_prints(pixels, device) if device is not None else None
    print(f"fingerprints on the device: {on_device}", flush=True)
    fingerprints: dict[str, dict[str, float]] = {}
    for count in processes:
        alone = fingerprint_times(pixels, count, single=False)
        with busy_interpreter():
            busy = fingerprint_times(pixels, count, single=False)
        fingerprints[str(count)] = {
            "alone_ms": alone["batch_ms"]["mean"],
            "busy_ms": busy["batch_ms"]["mean"],
            "busy_p50_ms": busy["batch_ms"]["p50"],
        }
    results = {
        "uploads": uploads,
        "rounds": rounds,
        "side": SIDE,
        "preparing_median_ms": preparing,
        "fingerprint_batch": FINGERPRINT_BATCH,
        "fingerprint_batches": batches,
        "fingerprint_ms_per_query": fingerprints,
        "fingerprint_on_device": on_device,
    }
    return results, table(results)


def table(results: dict[str, Any]) -> str:
    preparing = "\n".join(
        f"| {name} | {ms['alone']:.2f} | {ms['busy']:.2f} |"
        for name, ms in results["preparing_median_ms"].items()
    )
    hashing = "\n".join(
        f"| {count} | {ms['alone_ms']:.2f} | {ms['busy_ms']:.2f} (median {ms['busy_p50_ms']:.2f}) |"
        for count, ms in results["fingerprint_ms_per_query"].items()
    )
    return (
        f"Preparing a {results['side']} px upload, median ms over {results['uploads']} uploads x "
        f"{results['rounds']} rounds (bench.decode_contention):\n\n"
        "| step | alone | beside a busy thread |\n|---|---|---|\n"
        f"{preparing}\n\n"
        f"A screening batch of {results['fingerprint_batch']} fingerprinted on worker processes, "
        f"ms per query over {results['fingerprint_batches']} batches:\n\n"
        "| processes | alone | beside a busy thread |\n|---|---|---|\n"
        f"{hashing}\n"
        f"{_device_table(results.get('fingerprint_on_device'))}"
    )


def _device_table(device: dict[str, Any] | None) -> str:
    if device is None:
        return ""
    return (
        f"\nThe window hashes on {device['device']} instead (``device_hashes``, the service's "
        f"under ADVGUARD_STATEFUL_FINGERPRINT_DEVICE=auto): prints identical to the host's for "
        f"**{device['identical']} / {device['queries']}** queries; ms per query "
        f"{device['alone_ms']:.2f} alone, {device['busy_ms']:.2f} beside a busy thread "
        f"(median {device['busy_p50_ms']:.2f}).\n"
    )
