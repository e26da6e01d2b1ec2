"""Whether a store's index reaches close copies, and what it fetches besides: the close-copy
keys' figures, on training photos only (never the judged test photos or an attack run).

    python -m evaluation.close_keys            # -> close_keys.{json,md} in the results
    python -m evaluation.close_keys --grid     # the grid the keys' shape was chosen on

A close copy (``app.core.stateful.close_copies.close_copies``: every block mean within 9 grey
levels) only counts if a lookup reaches it, and a lookup reaches the stored queries filed in at
least ``MIN_SHARED_KEYS`` of the query's index buckets. Per key shape, on the first ``--photos``
CIFAR-10 training photos:

- *unrelated candidates*: for each photo, the other photos sharing at least that many of its
  buckets (window hashes and close-copy keys, as a store's lookup counts them): what a lookup
  fetches beyond its matches, per ``--photos`` stored;
- *misses*: the share of close copies sharing fewer than that many close-copy keys with their
  photo (the window hashes can only add), for three changes: every block mean moved by 9 with
  a random sign (the rule's worst case), every mean raised by 9, and ART's first Square probe
  (+-8/255 stripes, the change the keys exist for).

The grid (``--grid``) runs the close-copy keys alone over shapes of 4-10 means a key, cells of
48-128 levels and 40 or 64 keys; the shape in ``app.core.stateful`` was chosen on it before any
attack or honest-cost run: the fewest unrelated candidates among the shapes that miss at most
0.25% of the worst-case copies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.cli import at_least
from app.core.stateful.close_copies import (
    CLOSE_RADIUS,
    CloseKeyShape,
    block_means,
    close_copies,
    close_keys,
)
from app.core.stateful.defaults import default_scheme
from app.core.stateful.hashes import window_hashes
from app.core.stateful.index import MIN_SHARED_KEYS, index_buckets
from evaluation.honest_traffic import train_photos
from evaluation.options import CIFAR_SOURCE as DEFAULT_SOURCE
from evaluation.query_attacks import DEFAULT_RESULTS
from evaluation.stateful_replay import EVALUATION_SECRET
from evaluation.stateful_report import command_block

COMMAND = "python -m evaluation.close_keys"
GRID_COORDS = (4, 6, 8, 10)
GRID_CELLS = (48, 64, 96, 128)
GRID_TABLES = (40, 64)
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Misses:
    """Close copies of one change: the share the index misses, and the keys they keep."""

    change: str
    missed: float
    fewest_keys: int
    median_keys: float


@dataclass(frozen=True)
class ShapeFigures:
    shape: CloseKeyShape
    unrelated_per_photo: float  # mean other photos a lookup fetches, per ``photos`` stored
    unrelated_p99: float
    misses: list[Misses]


def changed_means(photos: U8, seed: int) -> dict[str, U8]:
    """The three changes' block means: all close copies of the photos' by construction."""
    rng = np.random.default_rng(seed)
    means = block_means(photos).astype(np.int16)
    signs = rng.choice([-8, 8], size=(len(photos), 3, 1, photos.shape[-1]))
    stripes = np.clip(photos.astype(np.int16) + signs, 0, 255).astype(np.uint8)
    worst = means + rng.choice([-CLOSE_RADIUS, CLOSE_RADIUS], size=means.shape)
    return {
        "every mean +-9": np.clip(worst, 0, 255).astype(np.uint8),
        "every mean +9": np.clip(means + CLOSE_RADIUS, 0, 255).astype(np.uint8),
        "Square's first probe": block_means(stripes),
    }


def shared_pairs(buckets: Sequence[npt.NDArray[np.int64]]) -> npt.NDArray[np.int32]:
    """(n, n) buckets each pair of queries shares (0 on the diagonal): a bucket filing k
    queries adds one to its k(k-1) ordered pairs."""
    n = len(buckets)
    shared = np.zeros((n, n), dtype=np.int32)
    owners: dict[int, list[int]] = {}
    for i, row in enumerate(buckets):
        for bucket in row.tolist():
            owners.setdefault(bucket, []).append(i)
    for members in owners.values():
        if len(members) > 1:
            idx = np.array(members)
            shared[np.ix_(idx, idx)] += 1
    np.fill_diagonal(shared, 0)
    return shared


def figures(
    photos: U8, shape: CloseKeyShape, window_keys: npt.NDArray[np.uint64] | None
) -> ShapeFigures:
    """One shape's figures. ``window_keys``: the photos' window hashes, filed beside the
    close-copy keys as a store does (None: the close-copy keys alone, as the grid compares)."""
    means = block_means(photos)
    keys = close_keys(means, EVALUATION_SECRET, shape)
    filed = keys if window_keys is None else np.concatenate([window_keys, keys], axis=1)
    fetched = (shared_pairs([index_buckets(row) for row in filed]) >= MIN_SHARED_KEYS).sum(axis=1)
    misses = []
    for change, changed in changed_means(photos, seed=0).items():
        assert all(close_copies(changed[i], means[i : i + 1])[0] for i in range(len(photos)))
        kept = (close_keys(changed, EVALUATION_SECRET, shape) == keys).sum(axis=1)
        misses.append(
            Misses(
                change,
                float(np.mean(kept < MIN_SHARED_KEYS)),
                int(kept.min()),
                float(np.median(kept)),
            )
        )
    return ShapeFigures(shape, float(fetched.mean()), float(np.percentile(fetched, 99)), misses)


def report(rows: list[ShapeFigures], photos: int, command: str, grid: bool) -> list[str]:
    keys = (
        "close-copy keys alone"
        if grid
        else "window hashes and close-copy keys, as a store files them"
    )
    lines = [
        "# Close-copy keys: what a lookup reaches (evaluation.close_keys)",
        "",
        f"{photos} CIFAR-10 training photos; index buckets: {keys}; a lookup fetches the stored "
        f"queries filed in at least {MIN_SHARED_KEYS} of the query's buckets. *Unrelated*: other "
        f"photos fetched per photo, with {photos} stored (mean, 99th percentile). *Missed*: "
        f"close copies sharing fewer than {MIN_SHARED_KEYS} close-copy keys with their photo.",
        "",
        "| keys | means a key | cell | unrelated (mean) | unrelated (p99) | "
        + " | ".join(f"missed: {m.change} (fewest / median keys)" for m in rows[0].misses)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(rows[0].misses),
    ]
    for row in rows:
        cells = " | ".join(
            f"{100 * m.missed:.2f}% ({m.fewest_keys} / {m.median_keys:.0f})" for m in row.misses
        )
        lines.append(
            f"| {row.shape.tables} | {row.shape.coords} | {row.shape.cell} | "
            f"{row.unrelated_per_photo:.3f} | {row.unrelated_p99:.0f} | {cells} |"
        )
    return lines + command_block(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photos",
        type=at_least(2),
        default=2000,
        help="first CIFAR-10 training photos measured on (default: %(default)s)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 JPEG tar with a train/ split (default: %(default)s)",
    )
    parser.add_argument("--grid", action="store_true", help="the shapes the default was chosen on")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_RESULTS, help="results directory (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    photos = train_photos(args.source, args.photos)
    if args.grid:
        shapes = [
            CloseKeyShape(tables, coords, cell)
            for coords, cell, tables in itertools.product(GRID_COORDS, GRID_CELLS, GRID_TABLES)
        ]
        window_keys = None
    else:
        shapes = [CloseKeyShape()]
        scheme = default_scheme(EVALUATION_SECRET)
        window_keys = window_hashes(photos, scheme.secret, scheme.step, scheme.window, scheme.top)
    rows = []
    for shape in shapes:
        rows.append(figures(photos, shape, window_keys))
        print(json.dumps(asdict(rows[-1]), default=str), flush=True)
    name = "close_keys_grid" if args.grid else "close_keys"
    command = " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {"photos": args.photos, "command": command, "rows": [asdict(r) for r in rows]}, indent=2
        )
    )
    (args.out / f"{name}.md").write_text("\n".join(report(rows, args.photos, command, args.grid)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
