"""Here, before a GPU run: fill what travels with the working tree, and check it fits.

``python -m bench.gpu.prepare`` (needs network for the wheels, and ../shared for CIFAR-10):

1. ``.whl/``: the wheels of ``bench/gpu/wheels.txt`` (``bench.gpu.wheels download``, verified);
2. ``.gpudata/cifar10-test-2000.tar.gz``: the first 2,000 CIFAR-10 test JPEGs in the archive's
   own layout (``test/<class>/<name>.jpg``), for the CUDA parity check; ../shared does not
   travel, and the whole 19 MB archive would spend a third of the cap on 58,000 unused images;
3. the size of everything that travels (tracked and untracked-not-ignored files, as the device
   tool counts them, plus both folders) against the 64 MiB cap.

Both folders are git-ignored; name them in the device call's ``carry``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.gpu import wheels

REPO = wheels.REPO
DATA_DIR = REPO / ".gpudata"
CIFAR_SUBSET = DATA_DIR / "cifar10-test-2000.tar.gz"
CIFAR_SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PARITY_IMAGES = 2000
CARRIED = (".whl", ".gpudata")
HEADROOM = 8 * wheels.MIB  # what must stay free under the cap for the tree to grow


def cifar_subset(source: Path, out: Path, count: int = PARITY_IMAGES, classes: int = 10) -> Path:
    """The first ``count / classes`` test JPEGs of each class of ``source`` (the archive is
    ordered by class) into a gzipped tar of the same layout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    per_class: dict[str, int] = {}
    kept = 0
    with tarfile.open(source) as archive, tarfile.open(partial, "w:gz") as subset:
        for member in archive:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) >= 3 and parts[-3] == "test"):
                continue
            if per_class.get(parts[-2], 0) >= count // classes:
                continue
            handle = archive.extractfile(member)
            assert handle is not None
            subset.addfile(member, handle)
            per_class[parts[-2]] = per_class.get(parts[-2], 0) + 1
            kept += 1
            if kept == count:
                break
    if kept < count:
        partial.unlink()
        raise ValueError(f"{source} holds {kept} test images, fewer than {count}")
    partial.replace(out)
    return out


def tree_files(repo: Path = REPO) -> list[Path]:
    """The files the device tool sends: tracked, and untracked but not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    return [repo / name.decode() for name in listed if name]


def tree_bytes(repo: Path = REPO) -> int:
    return sum(path.stat().st_size for path in tree_files(repo) if path.is_file())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def carry_report(repo: Path = REPO) -> tuple[int, str]:
    """(total bytes, one line per part) of what a device call with ``carry`` CARRIED sends."""
    parts = {"working tree": tree_bytes(repo)}
    parts |= {name: folder_bytes(repo / name) for name in CARRIED}
    total = sum(parts.values())
    lines = [f"{name}: {size / wheels.MIB:.1f} MiB" for name, size in parts.items()]
    lines.append(
        f"total: {total / wheels.MIB:.1f} MiB of {wheels.CARRY_LIMIT / wheels.MIB:.0f} MiB "
        f"({(wheels.CARRY_LIMIT - total) / wheels.MIB:.1f} MiB to spare)"
    )
    return total, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=CIFAR_SOURCE, help="CIFAR-10 JPEG tar")
    parser.add_argument("--skip-wheels", action="store_true", help="do not download wheels")
    args = parser.parse_args(argv)
    if not args.skip_wheels and wheels.main(["download"]) != 0:
        return 1
    if not CIFAR_SUBSET.is_file():
        cifar_subset(args.cifar, CIFAR_SUBSET)
    total, report = carry_report()
    print(report)
    if total > wheels.CARRY_LIMIT - HEADROOM:
        print(f"prepare: less than {HEADROOM // wheels.MIB} MiB would be left", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
