"""The evaluation's cache keys (``evaluation.run``, ``evaluation.selection``, ``evaluation.data``):
a cached prediction, attack or bundle is reused only for exactly what it was computed from.
Each test changes one thing a stale cache would miss (the pixels under the same rows, an attack
parameter, the seed, the source) and checks that the key changes with it, and nothing else does."""

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from app.core.errors import StaleWorkDirError
from evaluation.configurations import DetectorConfig, build_configuration, build_plan
from evaluation.data import ImageSplit, save_npz, source_stamp
from evaluation.options import EvaluateOptions
from evaluation.run import ImageSets, attack_key, predictions_key
from evaluation.selection import SelectionImages, selection_attack_key, selection_attack_runners
from evaluation.sets import Selection, pixels_digest
from index_builder.extract import check_fingerprint


def _mut(weights_sha: str = "w" * 64) -> Any:
    # attack_key and predictions_key read only the weights' digest of the model under test
    return SimpleNamespace(
        manifest=SimpleNamespace(model=SimpleNamespace(weights_sha256=weights_sha)),
        classifier=None,
    )


def _split(pixels: np.ndarray) -> ImageSplit:
    n = pixels.shape[0]
    return ImageSplit(pixels, np.arange(n) % 2, [f"c/{i}.jpg" for i in range(n)], ["a", "b"])


def _image_sets(split: ImageSplit, targets: np.ndarray) -> ImageSets:
    authentic = np.array([0, 1])
    return ImageSets(
        split=split,
        selection=Selection(authentic, np.array([2]), targets),
        test_accuracy=1.0,
        x_auth=split.tensor(authentic),
        y_auth=split.labels[authentic],
        targets=torch.from_numpy(targets),
        predictions=split.labels.copy(),
    )


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)


def test_pixels_digest_follows_every_byte_the_shape_and_the_dtype():
    pixels = _pixels()
    assert pixels_digest(pixels) == pixels_digest(pixels.copy())
    assert pixels_digest(pixels) == pixels_digest(torch.from_numpy(pixels))
    one_off = pixels.copy()
    one_off[2, 1, 3, 3] ^= 1
    assert pixels_digest(one_off) != pixels_digest(pixels)
    assert pixels_digest(pixels.reshape(3, 3, 2, 8)) != pixels_digest(pixels)
    assert pixels_digest(pixels.astype(np.int16)) != pixels_digest(pixels)
    # several arrays are not the same as their concatenation's bytes under another split
    flat = pixels.ravel()
    assert pixels_digest(flat[:10], flat[10:]) != pixels_digest(flat[:11], flat[11:])


def test_predictions_key_changes_with_the_pixels_under_the_same_file_names():
    pixels = _pixels()
    other = pixels.copy()
    other[1, 0, 0, 0] ^= 0x80  # another source (or preprocessing) under the same names
    assert predictions_key(_mut(), _split(pixels)) == predictions_key(_mut(), _split(pixels))
    assert predictions_key(_mut(), _split(other)) != predictions_key(_mut(), _split(pixels))
    assert predictions_key(_mut("v" * 64), _split(pixels)) != predictions_key(
        _mut(), _split(pixels)
    )


def test_attack_key_changes_with_the_attacked_pixels_and_targets_under_the_same_rows():
    pixels, targets = _pixels(), np.array([1, 0])
    key = attack_key(_mut(), _image_sets(_split(pixels), targets), seed=0)
    assert attack_key(_mut(), _image_sets(_split(pixels.copy()), targets.copy()), seed=0) == key

    attacked = pixels.copy()
    attacked[0, 2, 1, 1] ^= 1  # an attacked image differs, the rows do not
    assert attack_key(_mut(), _image_sets(_split(attacked), targets), seed=0) != key
    untouched = pixels.copy()
    untouched[2, 2, 1, 1] ^= 1  # row 2 is not attacked (an error image): the key stays
    assert attack_key(_mut(), _image_sets(_split(untouched), targets), seed=0) == key
    assert attack_key(_mut(), _image_sets(_split(pixels), np.array([1, 1])), seed=0) != key
    assert attack_key(_mut(), _image_sets(_split(pixels), targets), seed=1) != key


def _selection_images(pixels: np.ndarray) -> SelectionImages:
    return SelectionImages(
        torch.from_numpy(pixels.astype(np.float32) / 255),
        np.array([0, 1, 0]),
        torch.tensor([1, 0, 1]),
        "w" * 64,
        np.array([4, 5, 6]),
    )


def test_selection_attacks_are_keyed_by_every_parameter_they_read():
    options = EvaluateOptions(source=Path("unused"), out=Path("unused"))
    images = _selection_images(_pixels())

    def params(**attack: Any) -> dict[str, dict[str, object]]:
        changed = replace(options, attack=replace(options.attack, **attack))
        runners = selection_attack_runners(changed, _mut(), images)
        return {name: runner[0] for name, runner in runners.items()}

    default = params()
    linf = {"pgd", "pgd_untargeted"}
    l2 = {"pgd_l2", "pgd_l2_untargeted"}
    for name, change, expected in [
        ("pgd_eps", 4 / 255, linf),
        ("pgd_alpha", 1 / 255, linf),
        ("pgd_steps", 20, {*linf, *l2}),
        ("pgd_l2_eps", 0.25, l2),
        ("pgd_l2_alpha", 0.05, l2),
        ("fgsm_eps", 4 / 255, {"fgsm", "fgsm_untargeted"}),
    ]:
        changed = params(**{name: change})
        moved = {attack for attack in default if changed[attack] != default[attack]}
        assert moved == expected, name
    # a parameter no selection attack reads leaves every key alone
    assert params(cw_steps=99) == default


def test_selection_attack_key_changes_with_the_pixels_under_the_same_rows():
    pixels = _pixels()
    other = pixels.copy()
    other[0, 0, 0, 0] ^= 1
    key = selection_attack_key(_selection_images(pixels))
    assert selection_attack_key(_selection_images(pixels.copy())) == key
    assert selection_attack_key(_selection_images(other)) != key


@pytest.fixture
def build_inputs(tmp_path: Path) -> tuple[EvaluateOptions, Path, DetectorConfig]:
    source = tmp_path / "cifar.tar"
    source.write_bytes(b"an archive")
    weights = tmp_path / "model.th"
    weights.write_bytes(b"weights")
    options = EvaluateOptions(source=source, out=tmp_path / "out", cache_dir=tmp_path / "cache")
    return options, weights, DetectorConfig("v2", "v2", ("layer3",), preset="v2")


def test_a_cached_bundle_is_stamped_with_the_seed_and_the_source(build_inputs):
    options, weights, config = build_inputs
    stamp = build_plan(options, weights, config, "m").stamp
    assert build_plan(options, weights, config, "m").stamp == stamp

    assert build_plan(replace(options, seed=1), weights, config, "m").stamp != stamp

    mtime = options.source.stat().st_mtime_ns
    options.source.write_bytes(b"an archive")
    os.utime(options.source, ns=(0, mtime + 1_000_000))
    # the same bytes written again, as every fresh copy of ../shared is: the same source
    assert build_plan(options, weights, config, "m").stamp == stamp

    options.source.write_bytes(b"an archivE")
    os.utime(options.source, ns=(0, mtime))
    rewritten = build_plan(options, weights, config, "m").stamp
    assert rewritten != stamp  # other bytes of the same size, under the old mtime

    elsewhere = options.source.with_name("other.tar")
    elsewhere.write_bytes(options.source.read_bytes())
    os.utime(elsewhere, ns=(0, mtime))
    moved = build_plan(replace(options, source=elsewhere), weights, config, "m").stamp
    assert moved != rewritten  # same bytes and mtime, another archive

    assert build_plan(replace(options, build_per_class_limit=5), weights, config, "m").stamp != (
        rewritten
    )


def test_source_stamp_resolves_the_path(tmp_path: Path):
    source = tmp_path / "data.tar"
    source.write_bytes(b"x")
    link = tmp_path / "link.tar"
    link.symlink_to(source)
    assert source_stamp(link) == source_stamp(source)
    assert source_stamp(tmp_path / "." / "data.tar") == source_stamp(source)


def test_an_archive_is_stamped_by_its_bytes_and_a_directory_by_its_mtime(tmp_path: Path) -> None:
    """A fresh copy of an archive (new mtime, same bytes) keeps its caches; other bytes do not.
    A directory, which would cost a read of every image to hash, is stamped by its mtime."""
    source = tmp_path / "data.tar"
    source.write_bytes(b"archive")
    stamp = source_stamp(source)
    assert stamp["sha256"] == hashlib.sha256(b"archive").hexdigest()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(source, copy / "data.tar")  # a fresh copy: another mtime and inode
    os.utime(copy / "data.tar", ns=(0, source.stat().st_mtime_ns + 10**9))
    moved_back = {**source_stamp(copy / "data.tar"), "source": stamp["source"]}
    assert moved_back == stamp

    folder = tmp_path / "images"
    folder.mkdir()
    before = source_stamp(folder)
    assert "sha256" not in before
    os.utime(folder, ns=(0, folder.stat().st_mtime_ns + 10**9))
    assert source_stamp(folder) != before


def test_honest_traffic_is_keyed_by_its_whole_plan_the_source_and_the_preprocessing(
    tmp_path: Path,
):
    from app.core.models import PRESETS
    from evaluation.honest_traffic import TrafficPlan
    from evaluation.stateful_replay import honest_key

    source = tmp_path / "cifar.tar"
    source.write_bytes(b"an archive")
    cifar = SimpleNamespace(preset=PRESETS["cifar"])
    plan = TrafficPlan()
    key = honest_key(cifar, source, "train", plan, 0)
    assert honest_key(cifar, source, "train", TrafficPlan(), 0) == key
    others = [
        honest_key(cifar, source, "train", replace(plan, viral_images=40), 0),
        honest_key(cifar, source, "train", replace(plan, burst_edits=5), 0),
        honest_key(cifar, source, "test", plan, 0),
        honest_key(cifar, source, "train", plan, 1),
        honest_key(SimpleNamespace(preset=PRESETS["imagenet"]), source, "train", plan, 0),
    ]
    source.write_bytes(b"an archivE")  # other bytes of the same size
    others.append(honest_key(cifar, source, "train", plan, 0))
    assert len({key, *others}) == 1 + len(others)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_cache_file_is_written_under_a_temporary_name_of_its_own(
    tmp_path: Path, compressed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two evaluations side by side build the same cache file: each writes a temporary file
    named for its process, so neither renames the other's from under it (with one shared
    temporary name, one of two policy checks started together failed), and none is left."""
    path = tmp_path / "cache" / "split-abc.npz"
    other = path.with_name("split-abc.1.tmp.npz")  # another process's, half written
    other.parent.mkdir(parents=True)
    other.write_bytes(b"partial")
    written: list[str] = []
    name = "savez_compressed" if compressed else "savez"
    real = getattr(np, name)

    def recorded(file: Path, **arrays: Any) -> None:
        written.append(Path(file).name)
        real(file, **arrays)

    monkeypatch.setattr(np, name, recorded)
    save_npz(path, compressed=compressed, pixels=np.arange(6).reshape(2, 3))
    assert written == [f"split-abc.{os.getpid()}.tmp.npz"]
    with np.load(path) as data:
        np.testing.assert_array_equal(data["pixels"], np.arange(6).reshape(2, 3))
    assert other.read_bytes() == b"partial"
    assert sorted(p.name for p in path.parent.iterdir()) == [other.name, path.name]


def test_a_stale_work_directory_in_the_cache_is_started_afresh(
    build_inputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder refuses to resume another build's feature chunks (``check_fingerprint``
    raises ``StaleWorkDirError``); in the evaluation's own cache those chunks are garbage, so
    the build starts its work directory afresh instead of stopping the evaluation (every fresh
    copy of ../shared writes the CIFAR-10 archive again, which made every cached build's chunks
    stale). The build is a stand-in that fingerprints its work directory the builder's way."""
    import index_builder.build as build_module

    options, weights, config = build_inputs
    builds: list[Path] = []

    def build_bundle(build: Any, progress: bool) -> None:
        stamp = source_stamp(build.source)
        check_fingerprint(build.work_dir / "source", {"content_sha256": stamp["sha256"]})
        build.out.mkdir(parents=True, exist_ok=True)
        (build.out / "manifest.json").write_text("{}")
        builds.append(build.work_dir)

    monkeypatch.setattr(build_module, "build_bundle", build_bundle)
    logged: list[str] = []
    build_configuration(options, "resnet20", weights, config, "m", logged.append)
    assert len(builds) == 1 and not any("afresh" in line for line in logged)
    options.source.write_bytes(b"another archive")  # the archive written again, changed
    digest = source_stamp(options.source)["sha256"]
    with pytest.raises(StaleWorkDirError, match="different build"):  # as a user's directory
        check_fingerprint(builds[0] / "source", {"content_sha256": digest})
    build_configuration(options, "resnet20", weights, config, "m", logged.append)
    assert len(builds) == 2 and any("started afresh" in line for line in logged)
    fingerprint = json.loads((builds[1] / "source" / "fingerprint.json").read_text())
    assert fingerprint == {"content_sha256": digest}
