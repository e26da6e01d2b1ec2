"""``advguard classify``: one JSON verdict per image file, through the same Guard as the service."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.cli import at_least

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "cifar10-resnet20"


def _classify(args: argparse.Namespace) -> int:
    import torch

    from app.core.errors import AdvguardError
    from app.core.guard import Guard
    from app.core.images import ImageDecodeError, decode_image

    try:
        guard = Guard.load(args.bundle, device=args.device, retention=args.retention)
    except AdvguardError as exc:
        print(f"advguard classify: error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for start in range(0, len(args.files), args.batch_size):
        paths: list[Path] = args.files[start : start + args.batch_size]
        good: list[tuple[Path, torch.Tensor]] = []
        for path in paths:
            try:
                image = decode_image(path.read_bytes(), min_size=guard.preset.resize)
                good.append((path, guard.pixels(image)))
            except (OSError, ImageDecodeError) as exc:
                failures += 1
                print(json.dumps({"file": str(path), "error": str(exc)}))
        if not good:
            continue
        verdicts = guard.classify_pixels(torch.stack([pixels for _, pixels in good]))
        for (path, _), verdict in zip(good, verdicts, strict=True):
            print(json.dumps({"file": str(path), **asdict(verdict)}))
    return 1 if failures else 0


def register(commands: Any) -> None:
    classify = commands.add_parser("classify", help="print one JSON verdict per image file")
    classify.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle directory (default: the demo's)"
    )
    classify.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    classify.add_argument("--retention", type=float, help="use another calibrated threshold")
    classify.add_argument(
        "--batch-size", type=at_least(1), default=256, help="images per forward pass (default: 256)"
    )
    classify.add_argument("files", type=Path, nargs="+", help="image files, one verdict each")
    classify.set_defaults(run=_classify)
