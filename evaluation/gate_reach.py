"""Which successful adversarials a bundle's suspect gate reads, and which it lets by unread.

    python -m evaluation.gate_reach --bundle bundles/cifar10-resnet20 \
        --sets .cache/evaluation/sets/cifar10-resnet56.npz --out evaluation/results/gate-reach/...

The default detector reads its suspect JPEG margin only for the queries whose other statistics
combine below a gate (the 20% quantile of held-out authentic photos'): the rest are judged by
those other statistics alone. A set whose adversarials the gate mostly lets by unread is only as
well detected as it would be without the JPEG margin, whatever the margin says of the ones it
reads. This says, per attack, how many of a set's successful adversarials the gate reads and
how many of the read and the unread the bundle accepts; the authentic row does the same for
the photos they were made from. It explains misses; it chooses nothing.

The sets are a file that ``advguard evaluate`` exports per model (``<cache>/sets/<name>.npz``:
each exported attack's successful adversarials as 8-bit images, with the test photos they came
from). Judged by the bundle of another model, they are its transfer sets: an adversarial counts
where it fools the judged model and was made from a photo that model classifies correctly (the
evaluation's rule, ``evaluation.run.transfer_successes``). ``--stored 95`` judges them as JPEG
files of that quality, served as ``POST /classify`` would.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from app.core.guard import Guard
from evaluation import attacks
from evaluation.data import ImageSplit, load_split
from evaluation.honest_traffic import stored
from evaluation.options import add_test_split_arguments, write_study
from evaluation.run import transfer_successes
from evaluation.sets import AttackSets, load_attack_sets

COMMAND = "python -m evaluation.gate_reach"
CHUNK = 500  # images judged at a time: one pass holds every layer's activations


@dataclass(frozen=True)
class Reach:
    """One set judged by one bundle: counts of images."""

    name: str
    images: int
    accepted: int
    read: int  # the suspect gate reads their suspect margins
    accepted_read: int
    accepted_unread: int


def judge(guard: Guard, name: str, pixels: torch.Tensor) -> Reach:
    """The bundle's decisions on ``pixels`` ([0, 1] floats) as the service makes them (the
    deferred second pass for the suspects only), and which of them the gate read."""
    accepted, read = [], []
    for start in range(0, pixels.shape[0], CHUNK):
        batch = guard.infer(pixels[start : start + CHUNK])
        evidence = guard.evidence(batch)
        accepted.append(evidence.scores >= guard.threshold)
        read.append(guard.detector.suspects(evidence.values))
    took = np.concatenate(accepted) if accepted else np.zeros(0, dtype=bool)
    gated = np.concatenate(read) if read else np.zeros(0, dtype=bool)
    return Reach(
        name,
        int(took.size),
        int(took.sum()),
        int(gated.sum()),
        int((took & gated).sum()),
        int((took & ~gated).sum()),
    )


def as_judged(images: np.ndarray, quality: int | None, guard: Guard) -> torch.Tensor:
    """(n, 3, H, W) uint8 images -> the [0, 1] pixels the bundle judges: as they are (a PNG
    keeps 8-bit pixels), or decoded from a JPEG of ``quality`` as the service decodes it."""
    if quality is not None:
        images = stored(images.astype(np.float32) / 255.0, quality, guard.preset)
    return torch.from_numpy(images.astype(np.float32) / 255.0)


def reaches(guard: Guard, split: ImageSplit, sets: AttackSets, quality: int | None) -> list[Reach]:
    """The authentic photos the judged model classifies correctly, then every attack's
    adversarials that fool it, made from such photos."""
    model = attacks.LogitsModel(guard.network).eval()
    photos = split.pixels[sets.authentic_rows]
    clean = attacks.predict(model, as_judged(photos, None, guard))
    right = clean == split.labels[sets.authentic_rows]
    out = [judge(guard, "authentic", as_judged(photos[right], quality, guard))]
    for attack, images in sets.attacks.items():
        if attack not in sets.rows:
            raise ValueError(f"the sets file has no rows for {attack!r} (an older export)")
        made_from = sets.rows[attack]  # positions in authentic_rows
        pixels = as_judged(images, quality, guard)
        kept = transfer_successes(
            attacks.predict(model, pixels),
            clean[made_from],
            split.labels[sets.authentic_rows[made_from]],
        )
        out.append(judge(guard, attack, pixels[torch.from_numpy(kept)]))
    return out


def share(count: int, of: int) -> str:
    return f"{count / of:.1%}" if of else "-"


def markdown(result: dict[str, object], rows: list[Reach]) -> str:
    lines = [
        "# What the suspect gate reads (evaluation.gate_reach)",
        "",
        f"Generated by `{result['command']}`: the bundle `{result['bundle']}` judging the sets "
        f"of `{result['sets']}` ({result['stored_as']}). *Read*: the gate read the suspect "
        "margin (the other statistics combined below it); *unread*: judged by the other "
        "statistics alone.",
        "",
        "| set | images | accepted | read by the gate | accepted of the read | "
        "accepted of the unread |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        unread = r.images - r.read
        lines.append(
            f"| {r.name} | {r.images} | {share(r.accepted, r.images)} | "
            f"{share(r.read, r.images)} | {r.accepted_read} of {r.read} | "
            f"{r.accepted_unread} of {unread} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the judging bundle")
    parser.add_argument(
        "--sets", type=Path, required=True, help="a sets file `advguard evaluate` exported"
    )
    add_test_split_arguments(parser)
    parser.add_argument(
        "--stored", type=int, metavar="QUALITY", help="judge them as JPEGs of this quality"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="results directory: results.json and table.md"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stored is not None and not 1 <= args.stored <= 95:
        parser.error("--stored: a JPEG quality from 1 to 95")
    guard = Guard.load(args.bundle, device="cpu")
    if not guard.detector.suspect_columns:
        parser.error(f"{args.bundle}'s detector has no suspect gate (no suspect_margin)")
    sets = load_attack_sets(args.sets)
    split = load_split(args.source, "test", guard.preset, args.cache_dir)
    rows = reaches(guard, split, sets, args.stored)
    result: dict[str, object] = {
        "command": " ".join([COMMAND, *argv]),
        "bundle": str(args.bundle),
        "sets": str(args.sets),
        "stored_as": "8-bit pixels" if args.stored is None else f"JPEG {args.stored}",
        "threshold": guard.threshold,
        "rows": [asdict(r) for r in rows],
    }
    write_study(args.out, result, markdown(result, rows))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, COMMAND))
