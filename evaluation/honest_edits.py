"""What the guard does to honest edits of authentic photos: one table per bundle.

    python -m evaluation.honest_edits --bundle bundles/cifar10-resnet20 \
        --bundle <another bundle> --out evaluation/results/honest-edits

A user's photo is rarely the file the calibration saw: it is re-encoded, cropped, resized,
flipped or brightened on its way. The threshold holds 98% retention on held-out authentic
*training* images as they are stored; this measures the share accepted of the same test photos
after each honest edit, so that a statistic that mistakes an everyday edit for an attack shows
up here. Photos: the first ``--per-class`` CIFAR-10 test images of each class (the
evaluation's cached split). Every edit is uploaded as a PNG and served exactly as
``POST /classify`` would (``evaluation.honest_traffic.as_served``). Per bundle and edit: the
model's accuracy on the edited photos, the share of the correctly classified ones accepted
(with a 95% Wilson interval) and the share of all accepted.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageEnhance

from app.core.guard import Guard
from app.core.images import encode_image, jpeg_round_trip
from app.core.models import PreprocessingPreset
from evaluation.data import load_split
from evaluation.honest_traffic import as_served, to_pil
from evaluation.options import add_photo_study_arguments, checked_photo_count, write_study
from evaluation.simulate import wilson_interval

COMMAND = "python -m evaluation.honest_edits"


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    return lambda p: jpeg_round_trip(p, quality)


def _scale(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda p: p.resize((round(p.width * factor), round(p.height * factor)))


class _Enhancement(Protocol):
    """An ``ImageEnhance`` object (``Brightness(image)``, ``Color(image)``, ...): the edit at
    any strength."""

    def enhance(self, factor: float) -> Image.Image: ...


def _enhanced(
    enhancer: Callable[[Image.Image], _Enhancement], factor: float
) -> Callable[[Image.Image], Image.Image]:
    return lambda p: enhancer(p).enhance(factor)


def _sensor_noise(levels: float) -> Callable[[Image.Image], Image.Image]:
    """Gaussian noise of ``levels`` standard deviation (of 255) on every channel of every pixel,
    rounded and clipped: a camera's sensor noise, which no 4:2:0 JPEG of the training set holds.
    Seeded by the photo's own pixels, so a rerun adds the same noise."""

    def add(p: Image.Image) -> Image.Image:
        pixels = np.asarray(p.convert("RGB"), dtype=np.float64)
        rng = np.random.default_rng(zlib.crc32(pixels.tobytes()))
        noisy = np.rint(pixels + rng.normal(0.0, levels, pixels.shape))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    return add


def _centre_crop(fraction: float) -> Callable[[Image.Image], Image.Image]:
    def crop(p: Image.Image) -> Image.Image:
        side = round(min(p.size) * fraction)
        left, top = (p.width - side) // 2, (p.height - side) // 2
        return p.crop((left, top, left + side, top + side))

    return crop


# The edits, each with fixed parameters (the honest traffic's ranges, at their ends).
EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda p: p,
    "jpeg 95": _jpeg(95),
    "jpeg 75": _jpeg(75),
    "jpeg 50": _jpeg(50),
    "jpeg 30": _jpeg(30),
    "crop 7/8": _centre_crop(0.875),
    "resize x0.75": _scale(0.75),
    "resize x2": _scale(2.0),
    "flip": lambda p: p.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "brightness x0.8": _enhanced(ImageEnhance.Brightness, 0.8),
    "brightness x1.2": _enhanced(ImageEnhance.Brightness, 1.2),
    # edits of colour and texture, which the colour channels' noise statistic reads (since
    # selection round 6): a phone's saturation and sharpening filters
    "saturation x1.3": _enhanced(ImageEnhance.Color, 1.3),
    "saturation x0.7": _enhanced(ImageEnhance.Color, 0.7),
    "contrast x1.2": _enhanced(ImageEnhance.Contrast, 1.2),
    "sharpen x1.5": _enhanced(ImageEnhance.Sharpness, 1.5),
    # what a photo goes through on the web or in a printer: a GIF's (or an 8-bit PNG's) adaptive
    # palette of 256 colours, the 216-colour web palette with Floyd-Steinberg dithering (Pillow's
    # default conversion to a palette), and black and white (the service reads it as grey RGB)
    "palette 256 (GIF)": lambda p: p.convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
    "palette web, dithered": lambda p: p.convert("P"),
    "grayscale": lambda p: p.convert("L"),
    "sensor noise 1": _sensor_noise(1.0),
    "sensor noise 2": _sensor_noise(2.0),
    "sensor noise 4": _sensor_noise(4.0),
    # the same noise as a camera would store it: then a JPEG at quality 95 with 4:2:0 colour
    # subsampling (Pillow's default), which smooths the colour channels' part of it
    "sensor noise 2, JPEG 95": lambda p: jpeg_round_trip(_sensor_noise(2.0)(p), 95),
    "sensor noise 4, JPEG 95": lambda p: jpeg_round_trip(_sensor_noise(4.0)(p), 95),
}


@dataclass(frozen=True)
class EditRow:
    edit: str
    accuracy: float
    correct: int
    accepted_correct: float
    accepted_correct_interval: tuple[float, float]
    accepted_all: float


def served_edits(photos: np.ndarray, preset: PreprocessingPreset) -> dict[str, np.ndarray]:
    """Per edit, the (n, 3, H, W) uint8 pixels the service would compute from the edited PNG."""
    return {
        name: np.stack([as_served(encode_image(edit(to_pil(p)), None), preset) for p in photos])
        for name, edit in EDITS.items()
    }


def judge(guard: Guard, served: dict[str, np.ndarray], labels: np.ndarray) -> list[EditRow]:
    """Each edit's accuracy and acceptance under one bundle."""
    rows = []
    for name, pixels in served.items():
        batch = guard.infer(torch.from_numpy(pixels.astype(np.float32) / 255.0))
        accepted = guard.score(batch) >= guard.threshold
        correct = batch.predictions == labels
        kept = int(accepted[correct].sum())
        rows.append(
            EditRow(
                name,
                float(correct.mean()),
                int(correct.sum()),
                kept / max(int(correct.sum()), 1),
                wilson_interval(kept, int(correct.sum())),
                float(accepted.mean()),
            )
        )
    return rows


def _markdown(result: dict[str, object], per_bundle: dict[str, list[EditRow]]) -> str:
    lines = [
        "# Honest edits: accuracy and share accepted",
        "",
        f"Generated by `{result['command']}` on {result['photos']} CIFAR-10 test photos "
        f"({result['per_class']} per class), each edit uploaded as a PNG.",
        "",
    ]
    for label, rows in per_bundle.items():
        lines += [
            f"## {label}",
            "",
            "| edit | accuracy | correct photos accepted (95% interval) | all accepted |",
            "|---|---|---|---|",
        ]
        for r in rows:
            low, high = r.accepted_correct_interval
            kept = f"{100 * r.accepted_correct:.1f}% ({100 * low:.1f}-{100 * high:.1f}%)"
            lines.append(
                f"| {r.edit} | {100 * r.accuracy:.1f}% | {kept} of {r.correct} "
                f"| {100 * r.accepted_all:.1f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_study_arguments(parser, "bundle directory, a table each (repeatable)", "honest-edits")
    args = parser.parse_args(argv)
    checked_photo_count(parser, args)
    guards = [Guard.load(path, device="cpu") for path in args.bundle]
    presets = {guard.preset for guard in guards}
    if len(presets) != 1:
        parser.error("the bundles preprocess differently; compare bundles of one model family")
    preset = presets.pop()
    split = load_split(args.source, "test", preset, args.cache_dir, args.per_class)
    served = served_edits(split.pixels, preset)
    per_bundle = {}
    for path, guard in zip(args.bundle, guards, strict=True):
        label = f"{path} ({guard.manifest.detector.combination}, threshold {guard.threshold:.5f})"
        per_bundle[label] = judge(guard, served, split.labels)
    result: dict[str, object] = {
        "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
        "photos": int(split.labels.size),
        "per_class": args.per_class,
        "bundles": {label: [asdict(r) for r in rows] for label, rows in per_bundle.items()},
    }
    write_study(args.out, result, _markdown(result, per_bundle))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
