"""The demo bundle over the 10,000 CIFAR-10 test images, through ``advguard classify``.

Compares the guard's top-1 with the bare model's (plain torchvision transforms, no guard code),
and reports the share of correctly classified test images accepted at the default threshold:
the calibration, fitted on held-out *training* images, must hold on unseen data. For a bundle
whose detector runs a second pass for some images only (the mirrored image for ``doubt_margin``,
the JPEG round trip for ``suspect_margin``), also the share of images that pass runs for: what
that statistic costs on real traffic.
Usage: python -m bench.demo_accuracy [--bundle DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from app.cli import at_least
from app.core.bundle import read_manifest
from app.core.features import FLIPPED_LOGITS
from app.core.guard import Guard
from app.core.images import decode_image
from app.core.models import load_model
from bench.common import REPO, SHARED, write_results


def bare_top1(bundle: Path, files: list[Path], truth: list[int]) -> float:
    manifest = read_manifest(bundle)
    model = load_model(manifest.model.arch, bundle / manifest.model.weights_file, 10)
    spec = manifest.model.preprocessing
    transform = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(files), 500):
            batch = torch.stack(
                [transform(Image.open(f).convert("RGB")) for f in files[start : start + 500]]
            )
            predictions = model(batch).argmax(1).numpy()
            correct += int((predictions == np.array(truth[start : start + 500])).sum())
    return correct / len(files)


@dataclass(frozen=True)
class GatedPass:
    """The images a gated second pass runs for: which pass, and a (n,) bool per image."""

    name: str
    rows: np.ndarray


def gated_pass_rows(bundle: Path, files: list[Path]) -> GatedPass | None:
    """The images whose gated second pass the guard runs: the mirrored pass of those the first
    pass doubts (``doubt_margin``: the flipped logits the network computed), or the JPEG pass of
    those the detector suspects (``suspect_margin``: the rows the detector asks the network to
    look at again). None when the bundle's detector runs every second pass for every image, or
    none."""
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    if guard.network.mirror_below is None and not guard.network.deferred:
        return None
    asked: list[np.ndarray] = []
    for start in range(0, len(files), 500):
        images = [decode_image(f.read_bytes()) for f in files[start : start + 500]]
        batch = guard.infer(torch.stack([guard.pixels(image) for image in images]))
        if guard.network.mirror_below is not None:
            asked.append(~np.isnan(batch.features[FLIPPED_LOGITS]).any(axis=1))
        else:
            asked.append(guard.detector.suspects(guard.evidence(batch).values))
    name = (
        "the mirrored pass (doubt gate)"
        if guard.network.mirror_below is not None
        else "the JPEG pass (suspect gate)"
    )
    return GatedPass(name, np.concatenate(asked))


def _parser() -> argparse.ArgumentParser:
    """The options: which bundle, which archive, and how many images per class (a quick run)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--bundle",
        type=Path,
        default=REPO / "bundles" / "cifar10-resnet20",
        help="bundle directory (default: the demo's)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=SHARED / "data" / "cifar10-jpeg.tar.gz",
        help="CIFAR-10 JPEG tar with a test/ split (default: %(default)s)",
    )
    parser.add_argument("--limit", type=at_least(1), help="images per class (default: all 1,000)")
    return parser


def _extract_test_files(
    archive_path: Path, into: Path, classes: list[str], limit: int | None
) -> list[Path]:
    """The test JPEGs unpacked under ``into``, class by class in the bundle's class order (at
    most ``limit`` per class): ``advguard classify`` reads files, not the archive."""
    with tarfile.open(archive_path) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("test/") and m.isfile()]
        archive.extractall(into, members=members, filter="data")
    files: list[Path] = []
    for name in classes:
        found = sorted((into / "test" / name).glob("*.jpg"))
        files.extend(found[:limit] if limit else found)
    return files


def _classify(bundle: Path, files: list[Path]) -> tuple[list[dict[str, Any]], float]:
    """The verdicts of ``advguard classify`` in a fresh process, as a user runs it, and its wall
    time (start-up included): the figures must be the CLI's, not an in-process shortcut's."""
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "classify", "--bundle", str(bundle), *map(str, files)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    seconds = time.perf_counter() - started
    return [json.loads(line) for line in run.stdout.splitlines()], seconds


def _results(
    bundle: Path,
    verdicts: list[dict[str, Any]],
    truth: list[int],
    bare: float,
    seconds: float,
    gated: GatedPass | None,
) -> dict[str, Any]:
    """Every figure of the run, from the verdicts against the true classes: the results file
    and the table are both written from it."""
    predicted = np.array([v["predicted_class"] for v in verdicts])
    accepted = np.array([v["accepted"] for v in verdicts])
    correct = predicted == np.array(truth)
    results: dict[str, Any] = {
        "bundle": str(bundle.relative_to(REPO)),
        "images": len(truth),
        "guard_top1": float(correct.mean()),
        "bare_model_top1": bare,
        "accepted_of_correct": float(accepted[correct].mean()),
        "accepted_of_errors": float(accepted[~correct].mean()),
        "accepted_overall": float(accepted.mean()),
        "threshold": verdicts[0]["threshold"],
        "classify_seconds": seconds,
    }
    if gated is not None:
        results["gated_pass"] = gated.name
        results["gated_pass_overall"] = float(gated.rows.mean())
        results["gated_pass_of_correct"] = float(gated.rows[correct].mean())
    return results


def _table(results: dict[str, Any]) -> str:
    """The results file's markdown, from the results alone (the gated pass's row only for a
    bundle whose detector runs a second pass for some images)."""
    gated_lines = ""
    if "gated_pass" in results:
        gated_lines = (
            f"| images {results['gated_pass']} runs for, all / correctly classified | "
            f"{results['gated_pass_overall']:.2%} / {results['gated_pass_of_correct']:.2%} |\n"
        )
    return (
        f"`advguard classify` with {results['bundle']} over {results['images']:,} CIFAR-10 test "
        f"images (JPEG), default threshold {results['threshold']:.4f} (keeps 98% of held-out "
        "authentic training images).\n\n| figure | value |\n|---|---|\n"
        f"| top-1, guard (advguard classify) | {results['guard_top1']:.2%} |\n"
        "| top-1, bare model (torchvision transforms, no guard code) | "
        f"{results['bare_model_top1']:.2%} |\n"
        f"| correctly classified test images accepted | {results['accepted_of_correct']:.2%} |\n"
        f"| misclassified test images accepted | {results['accepted_of_errors']:.2%} |\n"
        f"{gated_lines}"
        "| wall time of advguard classify (incl. start-up) | "
        f"{results['classify_seconds']:.1f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    classes = read_manifest(args.bundle).class_names
    with tempfile.TemporaryDirectory(prefix="advguard-test-") as tmp:
        files = _extract_test_files(args.data, Path(tmp), classes, args.limit)
        truth = [classes.index(f.parent.name) for f in files]
        verdicts, seconds = _classify(args.bundle, files)
        bare = bare_top1(args.bundle, files, truth)
        gated = gated_pass_rows(args.bundle, files)
    results = _results(args.bundle, verdicts, truth, bare, seconds, gated)
    print(write_results("demo_accuracy", results, _table(results)).read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.demo_accuracy"))
