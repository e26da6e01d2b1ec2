"""Preparing an upload for the model beside a busy event loop: what the interpreter lock costs.

The service decodes and preprocesses uploads on a pool of threads while the event loop runs
Python for every request. Each numpy, torch or Pillow call over a whole image gives the
interpreter lock back and takes it again; beside a thread that runs Python without pause (the
loop at saturation, ``bench.common.busy_interpreter``) every retake waits up to the switch
interval (5 ms), so at ImageNet's 224x224 the number of such calls, not their work, prices a
request. On an H200 the GPU pack's service spent 170-250 ms per request in decoding at 256
connections (docs/deploy.md).

Per upload (the GPU pack's synthetic JPEGs, 224x224 by default, the ImageNet preset), each step
alone and beside a busy thread, in alternating rounds so that the machine's drift meets both:
``decode_image``; Pillow's resize and centre crop; the uint8 -> float conversion as
``image_to_pixels`` does it (``eight_bit_to_pixels``: one numpy call) and as torchvision's
``pil_to_tensor(...).float().div_(255)`` did it until 2026-11-30 (the same values, checked here
on every upload); and the whole ``image_to_pixels``. Median ms of each.
Usage: python -m bench.decode_contention [--uploads 48] [--rounds 4] [--size 224]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from app.cli import at_least
from app.core.features import eight_bit_to_pixels, image_to_pixels
from app.core.images import decode_image
from app.core.models import PRESETS, PreprocessingPreset
from bench.common import busy_interpreter, write_results
from bench.gpu.synthetic import jpegs

Step = Callable[[int], object]  # the step applied to upload i


def resized(image: Image.Image, preset: PreprocessingPreset) -> Image.Image:
    image = TF.resize(image, preset.resize, interpolation=TF.InterpolationMode.BILINEAR)
    cropped: Image.Image = TF.center_crop(image, [preset.crop, preset.crop])
    return cropped


def torchvision_conversion(image: Image.Image) -> torch.Tensor:
    converted: torch.Tensor = TF.pil_to_tensor(image).float().div_(255.0)
    return converted


def steps(data: list[bytes], preset: PreprocessingPreset) -> dict[str, Step]:
    """Each measured step, on inputs prepared beforehand so that a step times itself only."""
    decoded = [decode_image(item) for item in data]
    crops = [resized(image, preset) for image in decoded]
    for crop in crops:  # the two conversions agree, bit for bit, on every upload
        ours = eight_bit_to_pixels(np.asarray(crop)).numpy().view(np.uint32)
        if not np.array_equal(ours, torchvision_conversion(crop).numpy().view(np.uint32)):
            raise AssertionError("eight_bit_to_pixels differs from torchvision's conversion")
    return {
        "decode_image": lambda i: decode_image(data[i]),
        "resize + centre crop (Pillow)": lambda i: resized(decoded[i], preset),
        "conversion, image_to_pixels's (one numpy call)": lambda i: eight_bit_to_pixels(
            np.asarray(crops[i])
        ),
        "conversion, torchvision's (before 2026-11-30)": lambda i: torchvision_conversion(crops[i]),
        "image_to_pixels (resize, crop, conversion)": lambda i: image_to_pixels(decoded[i], preset),
    }


def timed(step: Step, uploads: int) -> list[float]:
    spent = []
    for i in range(uploads):
        started = time.perf_counter()
        step(i)
        spent.append(1000 * (time.perf_counter() - started))
    return spent


def measure(named: dict[str, Step], uploads: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per step, alone and beside a busy thread, over ``rounds`` alternating rounds."""
    times: dict[str, dict[str, list[float]]] = {name: {"alone": [], "busy": []} for name in named}
    for step in named.values():
        timed(step, uploads)  # warm
    for _ in range(rounds):
        for setting in ("alone", "busy"):
            with busy_interpreter() if setting == "busy" else nullcontext():
                for name, step in named.items():
                    times[name][setting] += timed(step, uploads)
    return {
        name: {setting: float(np.median(values)) for setting, values in by.items()}
        for name, by in times.items()
    }


def table(results: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {name} | {ms['alone']:.2f} | {ms['busy']:.2f} | {ms['busy'] / ms['alone']:.0f}x |"
        for name, ms in results["median_ms"].items()
    )
    ours = results["median_ms"]["conversion, image_to_pixels's (one numpy call)"]["busy"]
    theirs = results["median_ms"]["conversion, torchvision's (before 2026-11-30)"]["busy"]
    return (
        f"{results['uploads']} synthetic {results['size']}x{results['size']} JPEG uploads "
        f"(bench.gpu.synthetic, the GPU pack's), the {results['preset']} preset, "
        f"{results['rounds']} alternating rounds alone / beside a busy interpreter thread, "
        f"{results['torch_threads']} torch thread(s). Median ms per upload.\n\n"
        "| step | alone | beside a busy thread | ratio |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Beside the busy thread the conversion costs {ours:.2f} ms as image_to_pixels does it "
        f"against {theirs:.2f} ms as torchvision's chain did ({theirs / ours:.1f}x); both give "
        "the same values on every upload (checked before timing).\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uploads", type=at_least(1), default=48, help="distinct uploads per round"
    )
    parser.add_argument("--rounds", type=at_least(1), default=4, help="alternating rounds")
    parser.add_argument("--size", type=at_least(1), default=224, help="the uploads' side in pixels")
    parser.add_argument(
        "--preset",
        default="imagenet",
        choices=sorted(PRESETS),
        help="preprocessing preset: resize and crop (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-threads",
        type=at_least(0),
        default=0,
        help="torch's intra-op threads; 0: torch's own",
    )
    parser.add_argument("--name", default="decode_contention", help="results file name")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    preset = PRESETS[args.preset]
    data = jpegs(args.uploads, (args.size, args.size), seed=7)
    results: dict[str, Any] = {
        "uploads": args.uploads,
        "rounds": args.rounds,
        "size": args.size,
        "preset": preset.name,
        "torch_threads": torch.get_num_threads(),
        "median_ms": measure(steps(data, preset), args.uploads, args.rounds),
    }
    path = write_results(args.name, results, table(results))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.decode_contention"))
