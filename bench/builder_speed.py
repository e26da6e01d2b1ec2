"""Builder throughput against the bare model and the decoder, measured in one run.

Three rates on the same machine, in this order: (1) bare forward pass of the model on random
pixel batches, (2) decode + preprocessing alone over the source, (3) the builder's feature
extraction over the whole source (decode in DataLoader workers + forward + chunk writes), then
(1) again so drift from other load shows. Usage:
python -m bench.builder_speed [--source TAR] [--split train] [--arch resnet20] [--weights FILE]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.cli import at_least
from app.core.errors import ConfigError
from app.core.features import FeatureNetwork, image_to_pixels, infer_batch, pick_device
from app.core.images import decode_image
from app.core.models import PRESETS, describe_architecture, load_model
from bench.common import SHARED, write_results
from index_builder.build import build_bundle
from index_builder.config import BuildConfig
from index_builder.sources import open_source


def forward_rate(network: FeatureNetwork, batch: int, crop: int, seconds: float) -> float:
    """Images/s of the bare forward pass on random pixels already on the model's device (on a
    GPU, a host copy per batch would measure the bus, not the model)."""
    pixels = torch.rand(batch, 3, crop, crop, device=network.device)
    infer_batch(network, pixels)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        infer_batch(network, pixels)
        done += batch
    return done / (time.perf_counter() - started)


def decode_rate(source_path: Path, split: str | None, preset_name: str, limit: int) -> float:
    source = open_source(source_path, split)
    listing = source.listing()
    preset = PRESETS[preset_name]
    wanted = listing.entries[:limit]
    started = time.perf_counter()
    if source.streaming:
        members = {e.member for e in wanted}
        count = sum(
            image_to_pixels(decode_image(data, min_size=preset.resize), preset).shape[0] > 0
            for _, data in source.stream(members)
        )
    else:
        for entry in wanted:
            image_to_pixels(decode_image(source.read(entry), min_size=preset.resize), preset)
        count = len(wanted)
    return count / (time.perf_counter() - started)


def measure(
    source: Path,
    split: str | None,
    arch: str,
    weights: Path,
    batch_size: int = 256,
    workers: int = 2,
    forward_seconds: float = 15.0,
    decode_images: int = 10_000,
    device: str | None = None,
    keep_bundle: Path | None = None,
    **build_options: Any,
) -> dict[str, Any]:
    """Bare forward, decode alone, the builder's extraction, bare forward again (see the module
    docstring); ``device`` for the model (default: cuda when available), ``keep_bundle`` keeps
    the built bundle there (else it is deleted), ``build_options`` go to ``BuildConfig``. A
    ``keep_bundle`` that holds anything but a bundle is refused first: it would be replaced."""
    kept = keep_bundle
    if kept is not None and kept.exists() and not (kept / "manifest.json").is_file():
        raise ConfigError(f"--keep-bundle {kept} exists and is not a bundle")
    info = describe_architecture(arch)
    classes = len(open_source(source, split).listing(per_class_limit=1).classes)
    model = load_model(arch, weights, classes)
    preset = PRESETS[info.preset]
    network = FeatureNetwork(model, [info.default_layer], preset)
    network = network.to(pick_device(device)).eval()
    forward_before = forward_rate(network, batch_size, preset.crop, forward_seconds)
    decode = decode_rate(source, split, info.preset, decode_images)
    out = Path(tempfile.mkdtemp(prefix="advguard-bench-"))
    try:
        report = build_bundle(
            BuildConfig(
                source=source,
                split=split,
                arch=arch,
                weights=weights,
                out=out / "bundle",
                batch_size=batch_size,
                num_workers=workers,
                device=device,
                **build_options,
            ),
            progress=False,
        )
        if keep_bundle is not None:
            shutil.rmtree(keep_bundle, ignore_errors=True)
            shutil.move(out / "bundle", keep_bundle)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    forward_after = forward_rate(network, batch_size, preset.crop, forward_seconds)
    extraction = report.extraction[0]
    forward = (forward_before + forward_after) / 2
    return {
        "arch": arch,
        "source": str(source),
        "split": split,
        "device": str(network.device),
        "batch_size": batch_size,
        "workers": workers,
        "images": extraction.images + extraction.skipped,
        "forward_images_per_second_before": forward_before,
        "forward_images_per_second_after": forward_after,
        "decode_images_per_second": decode,
        "builder_extract_images_per_second": extraction.images_per_second,
        "builder_total_seconds": report.seconds,
        "builder_over_forward": extraction.images_per_second / forward,
    }


def table(results: dict[str, Any]) -> str:
    source = Path(results["source"]).name + (f"::{results['split']}" if results["split"] else "")
    return (
        f"{results['arch']} on {results['device']} over {results['images']:,} images of "
        f"{source}, batch {results['batch_size']}, {results['workers']} DataLoader workers.\n\n"
        "| rate | images/s |\n|---|---|\n"
        f"| bare forward pass (before / after the build) | "
        f"{results['forward_images_per_second_before']:.0f} / "
        f"{results['forward_images_per_second_after']:.0f} |\n"
        f"| decode + preprocess only (1 process) | {results['decode_images_per_second']:.0f} |\n"
        f"| builder feature extraction | {results['builder_extract_images_per_second']:.0f} |\n\n"
        f"Builder / mean bare forward: **{results['builder_over_forward']:.0%}**. Whole build "
        f"(extraction, PCA, index, calibration, bundle): {results['builder_total_seconds']:.1f} s."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source",
        type=Path,
        default=SHARED / "data" / "cifar10-jpeg.tar.gz",
        help="ImageFolder directory or .tar/.tar.gz of that layout (default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split folder inside the source, '' for none (default: %(default)s)",
    )
    parser.add_argument(
        "--arch",
        default="resnet20",
        help="resnet20..resnet110 (CIFAR) or a torchvision model name (default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=SHARED / "models" / "resnet20-12fca82f.th",
        help="local state-dict file of --arch (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=at_least(1),
        default=256,
        help="images per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=at_least(0),
        default=2,
        help="the build's DataLoader image-loading processes (default: %(default)s)",
    )
    parser.add_argument(
        "--forward-seconds",
        type=float,
        default=15.0,
        help="seconds of each bare forward-pass measurement (default: %(default)s)",
    )
    parser.add_argument(
        "--decode-images",
        type=at_least(1),
        default=10_000,
        help="images decoded by the decode-only timing, at most (default: %(default)s)",
    )
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--keep-bundle", type=Path, default=None, help="keep the built bundle")
    args = parser.parse_args(argv)

    results = measure(
        args.source,
        args.split or None,
        args.arch,
        args.weights,
        batch_size=args.batch_size,
        workers=args.workers,
        forward_seconds=args.forward_seconds,
        decode_images=args.decode_images,
        device=args.device,
        keep_bundle=args.keep_bundle,
    )
    print(write_results("builder_speed", results, table(results)).read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.builder_speed"))
