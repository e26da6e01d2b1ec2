"""The wheels carried to the GPU machine (bench/gpu/wheels.txt) and what travels with them.

All offline: the committed list pins every wheel by name, size and sha256, so the tags, the
one-version rule, the dependency closure by name and the carry total are checked without
downloading anything; ``verify`` (the files against the list, and each wheel's own
requirements) runs on small wheels made here.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from bench.gpu import prepare, wheels
from tests.conftest import CIFAR_TAR


def test_the_committed_list_is_installable_there_and_fits_with_room_to_spare() -> None:
    listed = wheels.read()
    wheels.check(listed)  # tags, one version per name, no torch, within the wheel budget
    assert all(wheels.runs_on_target(w) for w in listed)
    names = {w.name for w in listed}
    assert {"fastapi", "uvicorn", "pydantic", "pydantic-core", "faiss-cpu", "redis"} <= names
    assert not names & {"torch", "torchvision", "faiss-gpu"}
    total = sum(w.size for w in listed)
    assert total <= wheels.WHEEL_BUDGET == wheels.CARRY_LIMIT // 2


def test_every_runtime_dependency_is_carried_or_on_the_image() -> None:
    needed = wheels.project_requirements()
    assert {"torch", "fastapi", "faiss-cpu", "pydantic-settings"} <= set(needed)
    assert wheels.missing_on_machine(needed, wheels.read()) == []
    # and something the image lacks is reported, not assumed
    assert wheels.missing_on_machine(["fastapi", "uvloop", "sqlalchemy"], []) == [
        "fastapi",
        "sqlalchemy",
    ]


def test_carried_wheels_are_the_versions_the_image_pins(tmp_path: Path) -> None:
    pins = wheels.constraint_pins()
    assert {"redis", "hiredis", "fastapi", "uvicorn"} <= set(pins)
    assert wheels.off_pin(wheels.read(), pins) == []
    # another version than the pin is reported; an unpinned package is not
    stale = [wheels.Wheel("redis-8.1.0-py3-none-any.whl", 1, "0" * 64)]
    stale.append(wheels.Wheel("starlette-1.10.0-py3-none-any.whl", 1, "0" * 64))
    assert wheels.off_pin(stale, {"redis": "8.2.0"}) == [
        "redis-8.1.0-py3-none-any.whl (pinned: redis==8.2.0)"
    ]
    unreadable = tmp_path / "constraints.txt"
    unreadable.write_text("# the image's pins\nredis>=8\n")
    with pytest.raises(wheels.WheelListError, match="want 'name==version'"):
        wheels.constraint_pins(unreadable)


def test_tree_wheels_and_data_fit_the_carry_cap(tmp_path: Path) -> None:
    """What a device call with carry [".whl", ".gpudata"] sends: the working tree as git lists
    it, the listed wheels and the CIFAR-10 subset, with 8 MiB left for the tree to grow."""
    subset = prepare.cifar_subset(CIFAR_TAR, tmp_path / "cifar.tar.gz")
    files = prepare.tree_files()
    assert prepare.REPO / "bench" / "gpu" / "run.sh" in files
    carried = {prepare.REPO / name for name in prepare.CARRIED}
    assert not [f for f in files if carried & set(f.parents)]  # git-ignored: counted below
    total = prepare.tree_bytes() + sum(w.size for w in wheels.read()) + subset.stat().st_size
    assert total <= wheels.CARRY_LIMIT - prepare.HEADROOM, f"{total / wheels.MIB:.1f} MiB"


def test_the_cifar_subset_keeps_every_class_in_the_archive_layout(tmp_path: Path) -> None:
    import tarfile

    from bench.load_service import test_jpegs

    subset = prepare.cifar_subset(CIFAR_TAR, tmp_path / "c.tar.gz", count=50)
    with tarfile.open(subset) as archive:
        names = [m.name for m in archive]
    assert len(names) == 50 and all(name.startswith("test/") for name in names)
    assert len({name.split("/")[1] for name in names}) == 10  # 5 of each class
    assert len(test_jpegs(50, subset)) == 50


@pytest.mark.parametrize(
    ("file", "ok"),
    [
        ("fastapi-0.1-py3-none-any.whl", True),
        ("pydantic_core-2.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
        ("faiss_cpu-1.0-cp310-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
        ("x-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),  # another Python
        ("x-1.0-cp312-cp312-manylinux_2_17_aarch64.whl", False),  # another processor
        ("x-1.0-cp312-cp312-macosx_11_0_x86_64.whl", False),
        ("x-1.0-cp312-cp312-win_amd64.whl", False),
        ("x-1.0-cp313-abi3-manylinux_2_17_x86_64.whl", False),  # abi3 newer than 3.12
        ("x-1.0-py2-none-any.whl", False),
    ],
)
def test_wheel_tags(file: str, ok: bool) -> None:
    assert wheels.runs_on_target(wheels.Wheel(file, 1, "0" * 64)) is ok


def _line(file: str, size: int = 10) -> str:
    return f"{file} {size} {'a' * 64}"


def test_list_rules_refuse_what_the_install_would_get_wrong() -> None:
    pure = "a_b-1.0-py3-none-any.whl"
    with pytest.raises(wheels.WheelListError, match="line 2"):
        wheels.parse(f"# comment\n{pure} ten {'a' * 64}\n")
    with pytest.raises(wheels.WheelListError, match="several wheels"):
        wheels.check(wheels.parse(f"{_line(pure)}\n{_line('A.B-2.0-py3-none-any.whl')}"))
    with pytest.raises(wheels.WheelListError, match="must not be carried"):
        wheels.check(wheels.parse(_line("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl")))
    with pytest.raises(wheels.WheelListError, match="not installable"):
        wheels.check(wheels.parse(_line("x-1.0-cp312-cp312-win_amd64.whl")))
    with pytest.raises(wheels.WheelListError, match="over"):
        wheels.check(wheels.parse(_line(pure, 5 * wheels.MIB)), budget=4 * wheels.MIB)
    with pytest.raises(wheels.WheelListError, match="empty"):
        wheels.check(wheels.parse("# nothing\n\n"))
    parsed = wheels.parse(f"{_line(pure)}  # trailing comment\n")
    assert parsed[0].name == "a-b" and parsed[0].version == "1.0"


def _make_wheel(directory: Path, name: str, requires: list[str]) -> wheels.Wheel:
    file = f"{name}-1.0-py3-none-any.whl"
    path = directory / file
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", metadata)
    data = path.read_bytes()
    return wheels.Wheel(file, len(data), hashlib.sha256(data).hexdigest())


def test_verify_checks_the_files_and_each_wheels_requirements(tmp_path: Path) -> None:
    service = _make_wheel(
        tmp_path,
        "service",
        [
            "helper>=1",
            "numpy",  # on the image
            "colorama; sys_platform == 'win32'",  # not for Linux: ignored
            "sqlalchemy; extra == 'db'",  # an extra: ignored
            "async-timeout; python_full_version < '3.11.3'",  # not for 3.12: ignored
        ],
    )
    helper = _make_wheel(tmp_path, "helper", [])
    wheels.verify([service, helper], tmp_path)
    with pytest.raises(wheels.WheelListError, match=r"need \['helper'\]"):
        (tmp_path / helper.file).unlink()
        wheels.verify([service], tmp_path)
    with pytest.raises(wheels.WheelListError, match="missing from"):
        wheels.verify([service, helper], tmp_path)
    helper = _make_wheel(tmp_path, "helper", [])
    with pytest.raises(wheels.WheelListError, match="not the pinned wheel"):
        wheels.verify([service, wheels.Wheel(helper.file, helper.size, "b" * 64)], tmp_path)
    _make_wheel(tmp_path, "stray", [])
    with pytest.raises(wheels.WheelListError, match="unlisted"):
        wheels.verify([service, helper], tmp_path)


def test_cli_check_and_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert wheels.main(["check"]) == 0
    assert "check ok" in capsys.readouterr().out
    assert wheels.main(["files", "--dir", str(tmp_path)]) == 0
    paths = capsys.readouterr().out.split()
    assert [Path(p).name for p in paths] == [w.file for w in wheels.read()]
    bad = tmp_path / "bad.txt"
    bad.write_text(_line("x-1.0-cp312-cp312-win_amd64.whl"))
    assert wheels.main(["check", "--list", str(bad)]) == 1
    assert "not installable" in capsys.readouterr().err
