"""The wheels carried to the GPU machine: the list, its checks, and the download that fills it.

The GPU machine has no network and only its own image's packages (Python 3.12, torch 2.11,
torchvision 0.26, numpy, pillow, httpx, ...), so the service's other dependencies travel with the
working tree as wheels in ``.whl/`` (git-ignored), which ``bench/gpu/run.sh`` installs with
``pip install --no-index --no-deps --target``. What travels is capped at 64 MiB in all (the
tracked tree, the wheels and the carried data together), so:

- ``bench/gpu/wheels.txt`` pins each wheel by file name, size and sha256: the total is known
  without downloading anything (CI checks it), and a wheel that is not the pinned one is refused
  before it is installed;
- every wheel must run on CPython 3.12 on x86-64 Linux: pure Python (``py3-none-any``), or
  ``cp312``/``abi3`` for manylinux x86_64;
- every runtime dependency of the project, and every requirement of a carried wheel, is carried
  or already on the machine's image (``PREINSTALLED``, read from the device notes), so the
  ``--no-deps`` install is complete. torch and torchvision are never carried (the image's CUDA
  build is the point; ours would not even fit).

This module imports only the standard library (and ``packaging``, there on both machines), since
it runs before anything is installed. CLI: ``python -m bench.gpu.wheels check`` (the list),
``verify`` (the files in ``.whl/`` against it, with their requirements), ``download`` (here, with
network: ``pip download`` each pinned wheel into ``.whl/``), ``files`` (paths for pip).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEEL_LIST = HERE / "wheels.txt"
CONSTRAINTS = REPO / "deploy" / "docker" / "constraints.txt"  # the image's pinned versions
WHEEL_DIR = REPO / ".whl"
MIB = 1024 * 1024
CARRY_LIMIT = 64 * MIB  # the device tool's cap on the working tree plus carried paths
WHEEL_BUDGET = 32 * MIB  # the wheels' share: half the cap, leaving the tree and data room
NEVER_CARRIED = frozenset({"torch", "torchvision"})
TARGET_PYTHON = "cp312"
# Python packages on the GPU machine's image ("cuda"), as /work/.library/device/KINDS.md listed
# them on 2026-11-17 (names only; versions there are whatever the image holds).
_PREINSTALLED_NAMES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp"""
PREINSTALLED = frozenset(_PREINSTALLED_NAMES.split())
# What the project imports at run time beyond pyproject's dependencies: faiss (the `cpu` extra)
# for search, httpx for the benchmarks' load client.
EXTRA_RUNTIME = ("faiss-cpu", "httpx")
_LINE = re.compile(r"^(?P<file>\S+\.whl)\s+(?P<size>\d+)\s+(?P<sha256>[0-9a-f]{64})$")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


class WheelListError(ValueError):
    """The wheel list, or a wheel against it, is not what the GPU machine can install."""


@dataclass(frozen=True)
class Wheel:
    file: str
    size: int
    sha256: str

    @property
    def name(self) -> str:
        """The distribution's normalised name (PEP 503: lower case, runs of -_. as -)."""
        return normalise(self.file.split("-")[0])

    @property
    def version(self) -> str:
        return self.file.split("-")[1]

    @property
    def tags(self) -> tuple[str, str, str]:
        parts = self.file.removesuffix(".whl").split("-")
        return parts[-3], parts[-2], parts[-1]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str) -> list[Wheel]:
    """``<file> <size> <sha256>`` per line; ``#`` comments and blank lines are skipped."""
    wheels = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise WheelListError(f"line {number}: want '<file>.whl <size> <sha256>', got {raw!r}")
        wheels.append(Wheel(match["file"], int(match["size"]), match["sha256"]))
    return wheels


def read(path: Path = WHEEL_LIST) -> list[Wheel]:
    return parse(path.read_text())


def runs_on_target(wheel: Wheel) -> bool:
    """CPython 3.12 on x86-64 Linux: pure Python, or cp312 / an abi3 build for manylinux."""
    python, abi, platform = wheel.tags
    pythons, platforms = python.split("."), platform.split(".")
    if platforms == ["any"]:
        return abi == "none" and any(p in ("py3", "py312", TARGET_PYTHON) for p in pythons)
    linux = all(p.startswith("manylinux") and p.endswith("_x86_64") for p in platforms)
    if abi == TARGET_PYTHON:
        return linux and TARGET_PYTHON in pythons
    if abi == "abi3":  # stable ABI: any cp3N with N <= 12
        return linux and any(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12 for p in pythons)
    return False


def check(wheels: list[Wheel], budget: int = WHEEL_BUDGET) -> None:
    """The list's own rules: installable there, one version per name, no torch, within budget."""
    if not wheels:
        raise WheelListError("the wheel list is empty")
    names = [w.name for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise WheelListError(f"several wheels of {twice}: pip --no-deps would install both")
    carried_torch = sorted(NEVER_CARRIED & set(names))
    if carried_torch:
        raise WheelListError(f"{carried_torch} must not be carried: the machine's CUDA build is")
    foreign = [w.file for w in wheels if not runs_on_target(w)]
    if foreign:
        raise WheelListError(f"not installable on CPython 3.12 x86-64 Linux: {foreign}")
    total = sum(w.size for w in wheels)
    if total > budget:
        raise WheelListError(f"wheels total {total / MIB:.1f} MiB, over {budget / MIB:.0f} MiB")


def constraint_pins(constraints: Path = CONSTRAINTS) -> dict[str, str]:
    """The versions the image pins (``name==version`` lines of the constraints file), by name."""
    pins = {}
    for raw in constraints.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, equals, version = line.partition("==")
            if not equals:
                raise WheelListError(f"{constraints.name}: want 'name==version', got {raw!r}")
            pins[normalise(name.strip())] = version.strip()
    return pins


def off_pin(wheels: list[Wheel], pins: dict[str, str]) -> list[str]:
    """Carried wheels of another version than the image's pin: the GPU runs would measure
    other code than the image serves (redis-py 8.1.0 was carried while the image pinned 8.2.0)."""
    return [
        f"{w.file} (pinned: {w.name}=={pins[w.name]})"
        for w in wheels
        if w.name in pins and w.version != pins[w.name]
    ]


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """Names of what the project needs at run time: pyproject's dependencies + EXTRA_RUNTIME."""
    data = tomllib.loads(pyproject.read_text())
    names = [_requirement_name(r) for r in data["project"]["dependencies"]]
    return [*names, *EXTRA_RUNTIME]


def _requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement.strip())
    if match is None:
        raise WheelListError(f"cannot read a name in requirement {requirement!r}")
    return normalise(match.group(0))


def missing_on_machine(needed: Iterable[str], wheels: list[Wheel]) -> list[str]:
    """Names neither carried nor on the machine's image."""
    available = {w.name for w in wheels} | {normalise(n) for n in PREINSTALLED}
    return sorted({normalise(n) for n in needed} - available)


def verify(wheels: list[Wheel], directory: Path = WHEEL_DIR) -> None:
    """The files in ``directory`` are exactly the listed wheels (size and sha256), and every
    requirement of each (for CPython 3.12 on Linux, extras aside) is carried or preinstalled."""
    present = {p.name for p in directory.glob("*.whl")}
    listed = {w.file for w in wheels}
    if present - listed:
        raise WheelListError(f"unlisted wheels in {directory}: {sorted(present - listed)}")
    if listed - present:
        raise WheelListError(f"missing from {directory}: {sorted(listed - present)}")
    for wheel in wheels:
        path = directory / wheel.file
        if path.stat().st_size != wheel.size or _sha256(path) != wheel.sha256:
            raise WheelListError(f"{wheel.file} is not the pinned wheel (size or sha256 differs)")
    needed = [r for w in wheels for r in wheel_requirements(directory / w.file)]
    missing = missing_on_machine(needed, wheels)
    if missing:
        raise WheelListError(f"carried wheels need {missing}, neither carried nor preinstalled")


def wheel_requirements(path: Path) -> list[str]:
    """Names a wheel requires on CPython 3.12 / Linux (markers evaluated, extras left out)."""
    from packaging.requirements import Requirement

    environment = {"python_version": "3.12", "python_full_version": "3.12.3"}
    environment |= {"sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(metadata).decode())
    names = []
    for line in message.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.append(normalise(requirement.name))
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(wheels: list[Wheel], directory: Path = WHEEL_DIR) -> None:
    """``pip download`` each pinned wheel for CPython 3.12 manylinux x86_64 (needs network)."""
    directory.mkdir(parents=True, exist_ok=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64"]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(directory)]
    command += [arg for platform in platforms for arg in ("--platform", platform)]
    wanted = [f"{w.name}=={w.version}" for w in wheels if not (directory / w.file).is_file()]
    if wanted:
        subprocess.run([*command, *wanted], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("check", "verify", "download", "files"))
    parser.add_argument("--list", type=Path, default=WHEEL_LIST)
    parser.add_argument("--dir", type=Path, default=WHEEL_DIR)
    args = parser.parse_args(argv)
    try:
        wheels = read(args.list)
        check(wheels)
        missing = missing_on_machine(project_requirements(), wheels)
        if missing:
            raise WheelListError(f"the project needs {missing}: carry them or check the image")
        other_versions = off_pin(wheels, constraint_pins())
        if other_versions:
            raise WheelListError(f"not the versions the image pins: {other_versions}")
        if args.action == "download":
            download(wheels, args.dir)
        if args.action in ("verify", "download"):
            verify(wheels, args.dir)
    except (WheelListError, OSError, subprocess.CalledProcessError) as exc:
        print(f"wheels: {exc}", file=sys.stderr)
        return 1
    if args.action == "files":
        print("\n".join(str(args.dir / w.file) for w in wheels))
    else:
        total = sum(w.size for w in wheels)
        size = f"{total:,} bytes ({total / MIB:.1f} MiB)"
        print(f"wheels: {len(wheels)} wheels, {size}: {args.action} ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
