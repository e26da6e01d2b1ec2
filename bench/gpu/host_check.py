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

from app.core.features import image_to_pixels
from app.core.images import decode_image
from app.core.models import PRESETS
from bench.common import busy_interpreter
from bench.decode_contention import measure, steps
from bench.gpu.synthetic import jpegs
from bench.stateful_cost import FINGERPRINT_BATCH, fingerprint_times

SIDE = 224  # the service step's uploads


def run(
    uploads: int, rounds: int, batches: int, processes: tuple[int, ...]
) -> tuple[dict[str, Any], str]:
    preset = PRESETS["imagenet"]
    data = jpegs(uploads, (SIDE, SIDE), seed=7)
    preparing = measure(steps(data, preset), uploads, rounds)
    pixels = [image_to_pixels(decode_image(item), preset) for item in data]
    wanted = FINGERPRINT_BATCH * batches
    pixels = (pixels * -(-wanted // len(pixels)))[:wanted]  # the uploads again, as needed
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
    )
