"""Adversarials as an attacker would upload them: a PNG, or a JPEG at quality 95 or 75.

    python -m evaluation.stored_adversarials --bundle bundles/cifar10-resnet20 \
        --bundle <another bundle of the same model> --out evaluation/results/stored-adversarials

The evaluation judges adversarials as float pixels. An attacker uploads a file: a PNG keeps the
perturbation but for rounding to 8 bits; a JPEG with 4:2:0 colour subsampling (the default of
Pillow and of most encoders) smooths the colour channels, where the default detector's colour
statistic looks, and may also undo the attack. Per untargeted attack (FGSM, PGD-Linf, PGD-L2 at
the evaluation's parameters, crafted on the first bundle's model with its own weights) and per
file format: how many of the successful adversarials still fool the model once stored and
served as ``POST /classify`` would (``evaluation.honest_traffic.as_served``), and the share of
those each bundle accepts at its threshold (95% Wilson interval). ``--craft-bundle`` crafts them
on another model instead (a transfer attacker); "successful" then means fooling the judged one.
Photos: the first ``--per-class`` CIFAR-10 test images of each class that the judged model
classifies correctly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.core.guard import Guard
from app.core.models import PreprocessingPreset
from evaluation import attacks
from evaluation.data import eight_bit, load_split
from evaluation.honest_traffic import as_served, encode, to_pil
from evaluation.options import AttackParams, add_photo_study_arguments, checked_photo_count
from evaluation.simulate import wilson_interval

COMMAND = "python -m evaluation.stored_adversarials"

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], attacks.AttackOutput]
P = AttackParams()
ATTACKS: dict[str, Attack] = {
    "FGSM": lambda m, x, y: attacks.fgsm_untargeted(m, x, y, P.fgsm_eps),
    "PGD-Linf": lambda m, x, y: attacks.pgd_untargeted(
        m, x, y, P.pgd_eps, P.pgd_alpha, P.pgd_steps
    ),
    "PGD-L2": lambda m, x, y: attacks.pgd_l2_untargeted(
        m, x, y, P.pgd_l2_eps, P.pgd_l2_alpha, P.pgd_steps
    ),
}
FORMATS: dict[str, int | None] = {"PNG": None, "JPEG 95": 95, "JPEG 75": 75}


@dataclass(frozen=True)
class StoredRow:
    attack: str
    stored_as: str
    crafted: int  # successful adversarials as float pixels
    still_fooling: int  # of those, still misclassified once stored and served
    accepted: dict[str, float]  # bundle label -> share of ``still_fooling`` accepted
    accepted_interval: dict[str, tuple[float, float]]


def craft(
    model: nn.Module, x: torch.Tensor, labels: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Every attack's adversarials of ``x``, seeded (PGD starts at random): a rerun crafts the
    same ones."""
    torch.manual_seed(seed)
    targets = torch.from_numpy(labels)
    return {name: attack(model, x, targets).adversarial for name, attack in ATTACKS.items()}


def stored(adversarial: np.ndarray, quality: int | None, preset: PreprocessingPreset) -> np.ndarray:
    """(n, 3, H, W) float adversarials in [0, 1] -> the 8-bit pixels the service decodes from
    each one's file (PNG when ``quality`` is None, else a JPEG at that quality)."""
    files = eight_bit(adversarial)
    return np.stack([as_served(encode(to_pil(image), quality), preset) for image in files])


def rows_of_attack(
    name: str,
    model: nn.Module,
    adversarial: np.ndarray,
    labels: np.ndarray,
    guards: dict[str, Guard],
) -> list[StoredRow]:
    """One row per file format for one attack's adversarials of correctly classified photos
    (``model``: the bundles' classifier, which they share)."""
    crafted = attacks.predict(model, torch.from_numpy(adversarial)) != labels
    preset = next(iter(guards.values())).preset
    rows = []
    for stored_as, quality in FORMATS.items():
        pixels = torch.from_numpy(stored(adversarial[crafted], quality, preset) / 255.0).float()
        still = attacks.predict(model, pixels) != labels[crafted]
        accepted, intervals = {}, {}
        for label, guard in guards.items():
            batch = guard.infer(pixels[torch.from_numpy(still)])
            kept = int((guard.score(batch) >= guard.threshold).sum())
            accepted[label] = kept / max(int(still.sum()), 1)
            intervals[label] = wilson_interval(kept, int(still.sum()))
        rows.append(
            StoredRow(name, stored_as, int(crafted.sum()), int(still.sum()), accepted, intervals)
        )
    return rows


def crafted_on(result: dict[str, object]) -> str:
    """Whose model the attacks ran on, for the table's caption."""
    source = result.get("craft_bundle")
    return "the first bundle's model" if source is None else f"the model of `{source}`"


def markdown(result: dict[str, object], rows: list[StoredRow], labels: list[str]) -> str:
    lines = [
        "# Adversarials as uploaded files: still fooling the model, and accepted",
        "",
        f"Generated by `{result['command']}` on {result['photos']} correctly classified CIFAR-10 "
        f"test photos; untargeted attacks crafted on {crafted_on(result)}, each successful "
        "adversarial stored as the format says and served as `POST /classify` would.",
        "",
        "| attack | stored as | successful (float) | still fooling once stored | "
        + " | ".join(f"accepted by {label} (95% interval)" for label in labels)
        + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    for row in rows:
        cells = [
            f"{row.accepted[label]:.1%} ({row.accepted_interval[label][0]:.1%}-"
            f"{row.accepted_interval[label][1]:.1%})"
            for label in labels
        ]
        lines.append(
            f"| {row.attack} | {row.stored_as} | {row.crafted} | {row.still_fooling} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_study_arguments(
        parser, "bundle directory, a column each (repeatable; one model)", "stored-adversarials"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch's seed, for PGD's random starts (default: %(default)s)",
    )
    parser.add_argument(
        "--craft-bundle",
        type=Path,
        help="craft on this bundle's model instead (a transfer attacker, without the judged "
        "model's weights); the same preprocessing (default: the first --bundle's model)",
    )
    args = parser.parse_args(argv)
    checked_photo_count(parser, args)
    guards = {str(path): Guard.load(path, device="cpu") for path in args.bundle}
    if len({g.manifest.model.weights_sha256 for g in guards.values()}) != 1:
        parser.error("the bundles hold different models; compare bundles of one model")
    first = next(iter(guards.values()))
    split = load_split(args.source, "test", first.preset, args.cache_dir, args.per_class)
    photos = torch.from_numpy(split.pixels.astype(np.float32) / 255.0)
    model = attacks.LogitsModel(first.network).eval()
    correct = attacks.predict(model, photos) == split.labels
    x, labels = photos[correct], split.labels[correct]
    crafter = model
    if args.craft_bundle is not None:
        source = Guard.load(args.craft_bundle, device="cpu")
        if source.preset != first.preset:
            parser.error("--craft-bundle preprocesses differently from the judged bundles")
        crafter = attacks.LogitsModel(source.network).eval()
    rows = []  # successful: adversarials that fool the judged model, crafted on ``crafter``
    for name, adversarial in craft(crafter, x, labels, args.seed).items():
        rows += rows_of_attack(name, model, adversarial, labels, guards)
    result: dict[str, object] = {
        "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
        "photos": int(labels.size),
        "per_class": args.per_class,
        "seed": args.seed,
        "craft_bundle": None if args.craft_bundle is None else str(args.craft_bundle),
        "attack_params": asdict(P),
        "rows": [asdict(row) for row in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "table.md").write_text(markdown(result, rows, list(guards)))
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
