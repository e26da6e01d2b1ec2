"""Decode time of a 1080p JPEG upload, in full and with the decoder's own downscaling (draft).

The image is a CIFAR-10 test photo upscaled to 1920x1080 plus sensor-like noise, saved as JPEG
quality 90 (about the bytes per pixel of a phone photo; a smooth upscale alone would compress,
and so decode, unrealistically well), or any JPEG given with ``--image``. Full and draft runs
alternate so that load from other jobs hits both alike. Reports the median ms of
``decode_image`` alone and of decode + ``image_to_pixels`` for the ImageNet preset, and how far
the draft's pixels are from the full decode's. One torch thread by default, as in the builder's
DataLoader workers: with more, on a busy machine, the tiny uint8 -> float conversion of the crop
waited for descheduled intra-op threads (milliseconds) and swamped what was measured here, until
2026-11-30, when ``image_to_pixels`` began to convert with numpy (``bench.decode_contention``).
Usage:
python -m bench.decode_speed [--runs 200] [--image PHOTO.jpg] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.cli import at_least
from app.core.features import image_to_pixels
from app.core.images import decode_image
from app.core.models import PRESETS
from bench.common import SHARED, write_results

CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
CIFAR_PHOTO = "test/airplane/0000.jpg"


def photo_jpeg(width: int, height: int, noise: float, quality: int) -> bytes:
    """A CIFAR-10 photo upscaled to width x height, Gaussian noise of ``noise`` (8-bit units)."""
    with tarfile.open(CIFAR_TAR) as archive:
        member = archive.extractfile(CIFAR_PHOTO)
        if member is None:
            raise FileNotFoundError(f"{CIFAR_PHOTO} in {CIFAR_TAR}")
        small = Image.open(io.BytesIO(member.read())).convert("RGB")
    upscaled = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    noisy = upscaled + np.random.default_rng(0).normal(0, noise, upscaled.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def paired_timings(
    full: Callable[[], object], draft: Callable[[], object], runs: int
) -> dict[str, float]:
    """Median and best ms of each, interleaved (full, draft, full, ...) after a warm-up.

    The median is the typical cost under whatever else runs on the machine; the best is the
    closest to the cost on an idle core, so both are kept when the machine is shared.
    """
    for _ in range(5):
        full()
        draft()
    timings: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for call, out in ((full, timings[0]), (draft, timings[1])):
            started = time.perf_counter()
            call()
            out.append(1000 * (time.perf_counter() - started))
    return {
        "median_full": float(np.median(timings[0])),
        "median_draft": float(np.median(timings[1])),
        "best_full": float(np.min(timings[0])),
        "best_draft": float(np.min(timings[1])),
    }


def _row(step: str, ms: dict[str, float]) -> str:
    return (
        f"| {step} | {ms['median_full']:.2f} | {ms['median_draft']:.2f} | "
        f"{ms['median_full'] / ms['median_draft']:.1f}x | {ms['best_full']:.2f} | "
        f"{ms['best_draft']:.2f} | {ms['best_full'] / ms['best_draft']:.1f}x |"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=at_least(1), default=200, help="timed calls of each variant")
    parser.add_argument("--image", type=Path, help="a JPEG to use instead of the synthetic one")
    parser.add_argument(
        "--width",
        type=at_least(1),
        default=1920,
        help="the synthetic JPEG's width in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--height",
        type=at_least(1),
        default=1080,
        help="the synthetic JPEG's height in pixels (default: %(default)s)",
    )
    parser.add_argument("--noise", type=float, default=6.0, help="std of the added noise")
    parser.add_argument(
        "--quality",
        type=int,
        default=90,
        help="the synthetic JPEG's quality (default: %(default)s)",
    )
    parser.add_argument(
        "--preset",
        default="imagenet",
        choices=sorted(PRESETS),
        help="preprocessing preset; its resize is the draft's min size (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-threads",
        type=at_least(1),
        default=1,
        help="torch's intra-op threads (default: %(default)s)",
    )
    parser.add_argument("--name", default="decode_speed", help="results file name")
    return parser


@dataclass(frozen=True)
class Decoded:
    """One run's measurements: the results file's fields, and the two decodes' sizes."""

    results: dict[str, Any]
    full_size: tuple[int, int]
    draft_size: tuple[int, int]
    jpeg_bytes: int


def measure(args: argparse.Namespace) -> Decoded:
    """The JPEG decoded in full and in draft mode, alone and with ``image_to_pixels``, timed in
    interleaved pairs; and how far the draft's pixels are from the full decode's."""
    preset = PRESETS[args.preset]
    data = (
        args.image.read_bytes()
        if args.image
        else photo_jpeg(args.width, args.height, args.noise, args.quality)
    )
    size = preset.resize
    full_image, draft_image = decode_image(data), decode_image(data, min_size=size)
    decode_ms = paired_timings(
        lambda: decode_image(data), lambda: decode_image(data, min_size=size), args.runs
    )
    pixels_ms = paired_timings(
        lambda: image_to_pixels(decode_image(data), preset),
        lambda: image_to_pixels(decode_image(data, min_size=size), preset),
        args.runs,
    )
    std = torch.tensor(preset.std).view(3, 1, 1)
    difference = (image_to_pixels(full_image, preset) - image_to_pixels(draft_image, preset)) / std
    results: dict[str, Any] = {
        "image": str(args.image) if args.image else f"{CIFAR_PHOTO} upscaled + noise",
        "jpeg_bytes": len(data),
        "quality": None if args.image else args.quality,
        "noise_std": None if args.image else args.noise,
        "decoded_size_full": list(full_image.size),
        "decoded_size_draft": list(draft_image.size),
        "preset": preset.name,
        "min_size": size,
        "runs": args.runs,
        "decode_ms": decode_ms,
        "decode_and_pixels_ms": pixels_ms,
        "normalized_mean_abs_diff": difference.abs().mean().item(),
        "normalized_max_abs_diff": difference.abs().max().item(),
    }
    return Decoded(results, full_image.size, draft_image.size, len(data))


def report(args: argparse.Namespace, decoded: Decoded) -> str:
    """The results file's markdown: both steps, full against draft, and the pixels' difference."""
    results, data_bytes = decoded.results, decoded.jpeg_bytes
    preset, size = PRESETS[args.preset], results["min_size"]
    decode_ms, pixels_ms = results["decode_ms"], results["decode_and_pixels_ms"]
    (w, h), (dw, dh) = decoded.full_size, decoded.draft_size
    table = (
        f"{w}x{h} JPEG, {data_bytes / 1024:.0f} KB ({results['image']}); draft with "
        f"min_size = {size} (the {preset.name} preset's resize) decodes {dw}x{dh}. Median and best "
        f"of {args.runs} interleaved calls each, one process, {args.torch_threads} torch "
        "thread(s).\n\n"
        "| step | median ms, full | median ms, draft | speed-up | best ms, full | best ms, draft "
        "| speed-up |\n|---|---|---|---|---|---|---|\n"
        f"{_row('`decode_image`', decode_ms)}\n"
        f"{_row(f'decode + `image_to_pixels` ({preset.name})', pixels_ms)}\n\n"
        f"Pixels fed to the model, draft vs full decode, in normalised units: mean |diff| "
        f"{results['normalized_mean_abs_diff']:.4f}, max {results['normalized_max_abs_diff']:.3f}."
    )
    return table


def main(argv: list[str] | None = None) -> int:
    """parse -> measure -> report, written to bench/results/<name>.json and .md."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    decoded = measure(args)
    print(write_results(args.name, decoded.results, report(args, decoded)).read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.decode_speed"))
