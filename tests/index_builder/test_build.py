"""Bundle round trips through the real builder, on tiny real image folders."""

import dataclasses
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.bundle import load_honest_classes, read_manifest
from app.core.errors import BundleError, ConfigError, SourceError
from app.core.guard import Guard
from app.core.images import decode_image
from app.core.models import build_model
from app.service.settings import DEFAULT_BUNDLE as DEMO_BUNDLE
from index_builder import sources
from index_builder.build import SKIPPED_FILE, BuildReport, build_bundle, holdout_mask
from index_builder.cli import main as builder_main
from index_builder.cli import unreadable_lines
from index_builder.config import BuildConfig, check_config
from index_builder.extract import REASON_NOT_KEPT, UNREADABLE_FILE, Unreadable
from index_builder.sources import Entry
from tests.conftest import save_state_dict


def cifar_config(source: Path, weights: Path, out: Path, **overrides) -> BuildConfig:
    options = dict(
        source=source,
        arch="resnet20",
        weights=weights,
        out=out,
        k=20,
        holdout_fraction=0.25,
        num_workers=0,
        batch_size=16,
        chunk_size=8,
    )
    options.update(overrides)
    return BuildConfig(**options)


def classify_folder(guard: Guard, folder: Path) -> list:
    files = sorted(folder.rglob("*.png"))[:6]
    return guard.classify_images([decode_image(f.read_bytes()) for f in files])


def test_cifar_resnet_round_trip(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)
    report = build_bundle(cifar_config(folder, cifar_weights(3), tmp_path / "b"), progress=False)
    manifest = report.manifest
    assert manifest.counts.indexed == 27 and manifest.counts.holdout == 9
    # the default detector (v2, selection round 13): the paper's vote at the last residual block
    # + Mahalanobis of each stage's output + the logit margin + Mahalanobis of the pixels' and
    # of the colour channels' high-pass energy + the suspect JPEG margin, combined by the
    # harmonic mean p-value
    assert manifest.model.arch == "resnet20"
    assert manifest.detector.combination == "hmp"
    assert [(s.kind, s.layer) for s in manifest.detector.statistic_specs()] == [
        ("vote", "layer3.2"),
        *[("mahalanobis", stage) for stage in ("layer1.2", "layer2.2", "layer3.2")],
        ("margin", "linear"),
        ("mahalanobis", "pixels.highpass"),
        ("mahalanobis", "pixels.chromahighpass"),
        ("suspect_margin", "jpeg.logits"),
    ]
    assert manifest.detector.layers[0].output_dim == 26  # PCA capped at the sample rank
    assert set(manifest.calibration.thresholds) == {"0.90", "0.95", "0.98", "0.99"}
    assert manifest.calibration.threshold == manifest.calibration.thresholds["0.98"]
    guard = Guard.load(tmp_path / "b")
    verdicts = classify_folder(guard, folder)
    assert len(verdicts) == 6
    for v in verdicts:
        assert 0.0 <= v.score <= 1.0 and v.accepted == (v.score >= v.threshold)
        assert v.class_name == manifest.class_names[v.predicted_class]
    assert not (tmp_path / "b.work").exists()  # chunks removed after a successful build
    # the honest scores (every held-out image, errors included) contain the calibrated ones
    calibration = manifest.calibration
    assert calibration.honest_scores_file is not None
    honest = np.load(tmp_path / "b" / calibration.honest_scores_file)
    correct = np.load(tmp_path / "b" / calibration.scores_file)
    assert honest.shape == (calibration.n_images,) and correct.shape == (calibration.n_correct,)
    assert np.isin(correct, honest).all()


def test_a_separate_calibration_source_holds_nothing_out(
    make_image_folder, cifar_weights, tmp_path
):
    """``--calibration-source``: every source image is indexed, every calibration image is
    calibrated on (half the reference, half the threshold), and its classes must match."""
    folder = make_image_folder(classes=3, per_class=12)
    calibration = make_image_folder(classes=3, per_class=8, name="cal")
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", calibration_source=calibration)
    manifest = build_bundle(config, progress=False).manifest
    assert manifest.counts.indexed == 36 and manifest.counts.holdout == 0
    assert manifest.calibration.source == "directory"
    assert manifest.provenance.calibration_source == str(calibration)
    reference = np.load(tmp_path / "b" / manifest.calibration.reference_statistics_file)
    assert 0 < manifest.calibration.n_images < 24  # the threshold part
    assert 0 < len(reference) <= 24 - manifest.calibration.n_images  # the reference part
    assert len(classify_folder(Guard.load(tmp_path / "b"), folder)) == 6
    # each honest score's stored class is the class the served model predicts for that image
    honest = np.load(tmp_path / "b" / str(manifest.calibration.honest_scores_file))
    classes = load_honest_classes(tmp_path / "b", manifest)
    assert classes is not None and classes.shape == honest.shape
    images = [decode_image(f.read_bytes()) for f in sorted(calibration.rglob("*.*"))]
    assert len(images) == 24
    served = [
        (v.score, v.predicted_class) for v in Guard.load(tmp_path / "b").classify_images(images)
    ]
    for score, predicted in zip(honest, classes, strict=True):
        assert any(abs(s - score) < 1e-4 and c == predicted for s, c in served), (score, predicted)
    other = make_image_folder(classes=2, per_class=8, name="other")
    wrong = cifar_config(folder, cifar_weights(3), tmp_path / "c", calibration_source=other)
    with pytest.raises(SourceError, match="classes differ"):
        build_bundle(wrong, progress=False)


def test_torchvision_resnet18_round_trip_at_224(make_image_folder, tmp_path):
    """Random-weight ResNet-18, ImageNet preprocessing, layer avgpool (512-d), PCA to 256."""
    folder = make_image_folder(classes=3, per_class=95, size=48)
    torch.manual_seed(0)
    weights = save_state_dict(build_model("resnet18", 3), tmp_path / "r18.pt", nested=False)
    config = BuildConfig(
        source=folder,
        arch="resnet18",
        weights=weights,
        out=tmp_path / "r18",
        layers=("avgpool",),
        k=50,
        num_workers=0,
        batch_size=32,
        holdout_fraction=0.05,  # 270 indexed: PCA to 256
    )
    manifest = build_bundle(config, progress=False).manifest
    layer = manifest.detector.layers[0]
    assert (layer.name, layer.input_dim, layer.output_dim) == ("avgpool", 512, 256)
    assert manifest.model.preprocessing.crop == 224 and manifest.model.preprocessing.resize == 256
    guard = Guard.load(tmp_path / "r18")
    assert len(classify_folder(guard, folder)) == 6


def _skipped_file(bundle: Path) -> list[dict[str, str]]:
    listed: list[dict[str, str]] = json.loads((bundle / SKIPPED_FILE).read_text())
    return listed


# make_image_folder's corrupt files: even ones truncated JPEGs, odd ones not images at all;
# the truncation's own words are Pillow's
TRUNCATED = "cannot decode image: OSError: "
NOT_AN_IMAGE = "cannot decode image: not an image format Pillow reads"


def _reason_kind(reason: str) -> str:
    return TRUNCATED if reason.startswith(TRUNCATED) else reason


def test_corrupt_images_are_skipped_counted_and_listed_with_their_reasons(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=10, corrupt=2)
    report = build_bundle(cifar_config(folder, cifar_weights(3), tmp_path / "b"), progress=False)
    manifest = report.manifest
    assert manifest.counts.skipped == 6
    # indexed and held out count only images that were read: 36 listed, 6 unreadable
    assert manifest.counts.indexed + manifest.counts.holdout == 30
    assert manifest.counts.holdout > 0
    expected = [
        {"image": f"class_{c:02d}/bad_{i:02d}.jpg", "reason": TRUNCATED if i == 0 else NOT_AN_IMAGE}
        for c in range(3)
        for i in range(2)
    ]
    listed = [
        {"image": u["image"], "reason": _reason_kind(u["reason"])}
        for u in _skipped_file(tmp_path / "b")
    ]
    assert sorted(listed, key=lambda u: u["image"]) == expected
    assert [dataclasses.asdict(u) for u in report.unreadable] == _skipped_file(tmp_path / "b")
    assert SKIPPED_FILE in manifest.files  # checksummed like every other file
    Guard.load(tmp_path / "b")  # verifies it


def test_a_source_read_whole_writes_no_skipped_list(make_image_folder, cifar_weights, tmp_path):
    report = build_bundle(
        cifar_config(make_image_folder(classes=3, per_class=8), cifar_weights(3), tmp_path / "b"),
        progress=False,
    )
    assert report.unreadable == [] and not (tmp_path / "b" / SKIPPED_FILE).exists()
    assert SKIPPED_FILE not in report.manifest.files


def test_the_build_names_the_first_unreadable_images_and_where_the_rest_are(tmp_path):
    found = [Unreadable(f"c/{i}.jpg", "empty file") for i in range(7)]
    manifest = read_manifest(DEMO_BUNDLE)
    lines = unreadable_lines(BuildReport(tmp_path / "b", manifest, unreadable=found))
    assert lines[0] == (
        f"advguard build: skipped 7 unreadable image(s), each listed with its reason in "
        f"{tmp_path / 'b' / SKIPPED_FILE}:"
    )
    assert lines[1:] == [f"  c/{i}.jpg: empty file" for i in range(5)] + ["  ... and 2 more"]
    assert unreadable_lines(BuildReport(tmp_path / "b", manifest)) == []


def test_unreadable_calibration_images_are_counted_as_skipped(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=12)
    calibration = make_image_folder(classes=3, per_class=8, name="cal", corrupt=2)
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", calibration_source=calibration)
    counts = build_bundle(config, progress=False).manifest.counts
    assert (counts.indexed, counts.holdout, counts.skipped) == (36, 0, 6)
    listed = [u["image"] for u in _skipped_file(tmp_path / "b")]
    assert sorted(listed) == [
        f"calibration:class_{c:02d}/bad_{i:02d}.jpg" for c in range(3) for i in range(2)
    ]


@pytest.mark.parametrize("in_memory_limit", [None, 0], ids=["in-memory", "streamed"])
def test_archive_with_workers_matches_directory(
    make_image_folder, cifar_weights, tmp_path, monkeypatch, in_memory_limit
):
    if in_memory_limit is not None:
        monkeypatch.setattr(sources, "MAX_IN_MEMORY_ARCHIVE_BYTES", in_memory_limit)
    folder = make_image_folder(classes=3, per_class=10, corrupt=1)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="train")
    weights = cifar_weights(3)
    direct = build_bundle(cifar_config(folder, weights, tmp_path / "d"), progress=False)
    streamed = build_bundle(
        cifar_config(archive, weights, tmp_path / "t", split="train", num_workers=2),
        progress=False,
    )
    assert direct.manifest.calibration.thresholds == pytest.approx(
        streamed.manifest.calibration.thresholds
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "d" / "labels.npy"), np.load(tmp_path / "t" / "labels.npy")
    )
    assert direct.unreadable == streamed.unreadable  # read in place or streamed by workers
    assert [_reason_kind(u.reason) for u in direct.unreadable] == [TRUNCATED] * 3


def test_killed_build_resumes_without_recomputing(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)  # 36 images = 5 chunks of 8
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b")

    def die_after_two(chunk: int) -> None:
        if chunk == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        build_bundle(config, progress=False, on_chunk_written=die_after_two)
    assert not (tmp_path / "b").exists()
    written: list[int] = []
    report = build_bundle(config, progress=False, on_chunk_written=written.append)
    assert report.extraction[0].chunks_reused == 2
    assert report.extraction[0].chunks_computed == 3 and 0 not in written and 1 not in written
    build_bundle(cifar_config(folder, cifar_weights(3), tmp_path / "c"), progress=False)
    np.testing.assert_array_equal(
        np.load(tmp_path / "b" / "calibration_scores.npy"),
        np.load(tmp_path / "c" / "calibration_scores.npy"),
    )


def test_a_resumed_build_keeps_the_reasons_of_the_chunks_it_reuses(
    make_image_folder, cifar_weights, tmp_path
):
    """The reasons are written with each chunk; a chunk from a build that kept none (an older
    version's work directory) still lists its unreadable images, saying the reason is unknown."""
    folder = make_image_folder(classes=3, per_class=5, corrupt=1)  # 18 files, 3 chunks of 8
    work = tmp_path / "work"
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", work_dir=work)

    def die_after_first(chunk: int) -> None:
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        build_bundle(config, progress=False, on_chunk_written=die_after_first)
    first = work / "source" / "chunk_00000"
    kept = json.loads((first / UNREADABLE_FILE).read_text())
    assert list(kept) == ["5"] and _reason_kind(kept["5"]) == TRUNCATED
    report = build_bundle(config, progress=False)
    assert report.extraction[0].chunks_reused == 1
    assert [(u.image, _reason_kind(u.reason)) for u in report.unreadable] == [
        ("class_00/bad_00.jpg", TRUNCATED),
        ("class_01/bad_00.jpg", TRUNCATED),
        ("class_02/bad_00.jpg", TRUNCATED),
    ]
    with pytest.raises(KeyboardInterrupt):
        build_bundle(config, progress=False, on_chunk_written=die_after_first)
    (first / UNREADABLE_FILE).unlink()
    report = build_bundle(config, progress=False)
    reasons = [_reason_kind(u.reason) for u in report.unreadable]
    assert reasons == [REASON_NOT_KEPT, TRUNCATED, TRUNCATED]


def test_resume_refuses_chunks_of_another_build(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=8)
    work = tmp_path / "work"
    build_bundle(
        cifar_config(folder, cifar_weights(3), tmp_path / "b", work_dir=work, keep_work_dir=True),
        progress=False,
    )
    other = make_image_folder(classes=3, per_class=9, name="other")
    with pytest.raises(
        SourceError,
        match=r"different build \(content_sha256, entries, entries_sha256, source differ",
    ):
        build_bundle(
            cifar_config(other, cifar_weights(3), tmp_path / "c", work_dir=work), progress=False
        )


@pytest.mark.parametrize("target", ["index_layer3_2.faiss", "model.pth", "labels.npy", "manifest"])
def test_tampered_bundle_is_refused(make_image_folder, cifar_weights, tmp_path, target):
    folder = make_image_folder(classes=3, per_class=8)
    bundle = build_bundle(
        cifar_config(folder, cifar_weights(3), tmp_path / "b"), progress=False
    ).bundle
    if target == "manifest":
        data = json.loads((bundle / "manifest.json").read_text())
        data["model"]["weights_sha256"] = "0" * 64
        (bundle / "manifest.json").write_text(json.dumps(data))
    else:
        path = bundle / target
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    expected = f"file {target} does not match"
    if target == "manifest":
        expected = "weights' sha256 differs"
    with pytest.raises(BundleError, match=expected):
        Guard.load(bundle)


def test_model_not_matching_the_bundle_is_refused(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=8)
    bundle = build_bundle(
        cifar_config(folder, cifar_weights(3), tmp_path / "b"), progress=False
    ).bundle
    torch.manual_seed(123)
    other = save_state_dict(build_model("resnet20", 3), tmp_path / "other.pt", nested=False)
    with pytest.raises(BundleError, match="do not match"):
        Guard.load(bundle, weights_path=other)


def test_holdout_is_deterministic_per_class():
    entries = [Entry(f"c{label}/{i}.png", label) for label in range(3) for i in range(40)]
    mask = holdout_mask(entries, 0.05, seed=0)
    assert mask.sum() == 6 and (mask == holdout_mask(entries, 0.05, seed=0)).all()
    assert [int(mask[label * 40 : (label + 1) * 40].sum()) for label in range(3)] == [2, 2, 2]
    assert (mask != holdout_mask(entries, 0.05, seed=1)).any()


def test_python_m_index_builder_cli(make_image_folder, cifar_weights, tmp_path, capsys):
    folder = make_image_folder(classes=3, per_class=8)
    code = builder_main(
        [
            "--source",
            str(folder),
            "--arch",
            "resnet20",
            "--weights",
            str(cifar_weights(3)),
            "--out",
            str(tmp_path / "b"),
            "--k",
            "10",
            "--workers",
            "0",
            "--quiet",
            "--detector",
            "paper",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = read_manifest(tmp_path / "b")
    assert summary["indexed"] == manifest.counts.indexed
    assert manifest.detector.combination == "single"
    assert [(s.kind, s.layer) for s in manifest.detector.statistic_specs()] == [
        ("vote", "layer3.2")
    ]
    bad = builder_main(
        [
            "--source",
            str(folder),
            "--arch",
            "resnet21",
            "--weights",
            str(cifar_weights(3)),
            "--out",
            str(tmp_path / "c"),
            "--quiet",
        ]
    )
    assert bad == 2 and "unknown architecture" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"retention": 1.5}, "--retention must be one of 0.90, 0.95, 0.98, 0.99 (got 1.5)"),
        ({"k": 0}, "--k must be at least 1 (got 0)"),
        ({"pca_dims": 0}, "--pca-dims must be at least 1 (got 0)"),
        ({"batch_size": 0}, "--batch-size must be at least 1 (got 0)"),
        ({"holdout_fraction": 1.0}, "--holdout-fraction must be between 0 and 1 (got 1.0)"),
        ({"num_workers": -1}, "--workers must be at least 0 (got -1)"),
        ({"per_class_limit": -1}, "--per-class-limit must be at least 1 (got -1)"),
        ({"per_class_limit": 0}, "--per-class-limit must be at least 1 (got 0)"),
        ({"license_file": Path("missing.txt")}, "--license-file missing.txt is not a file"),
    ],
)
def test_options_out_of_range_are_refused_before_any_image_is_read(tmp_path, overrides, message):
    """A source that does not exist: the option is refused first (it used to surface after the
    extraction: a wasted ILSVRC pass, or a bundle with 0-d features for --pca-dims 0)."""
    config = cifar_config(tmp_path / "nowhere", tmp_path / "none.th", tmp_path / "b", **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_bundle(config, progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.work").exists()


def test_an_out_or_work_directory_holding_other_files_is_refused_and_left_alone(
    make_image_folder, cifar_weights, tmp_path, capsys
):
    """The write replaces --out and the work directory is deleted when the build is done: a
    directory holding anything else is refused, and keeps its files. A bundle is rebuilt."""
    folder = make_image_folder(classes=3, per_class=8)
    weights = cifar_weights(3)
    precious = tmp_path / "results"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    argv = ["--source", str(folder), "--arch", "resnet20", "--weights", str(weights)]
    argv += ["--k", "10", "--workers", "0", "--quiet", "--detector", "paper"]
    assert builder_main([*argv, "--out", str(precious)]) == 2
    assert "holds files and is not a bundle" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "mine" and (precious / "sub").is_dir()
    work = tmp_path / "scratch"
    work.mkdir()
    (work / "keep.npy").write_bytes(b"x")
    assert builder_main([*argv, "--out", str(tmp_path / "b"), "--work-dir", str(work)]) == 2
    assert "holds files the build did not write (keep.npy)" in capsys.readouterr().err
    assert (work / "keep.npy").read_bytes() == b"x" and not (tmp_path / "b").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert builder_main([*argv, "--out", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
    # an empty directory, then the bundle built in it, are fine to (re)build into
    (tmp_path / "empty").mkdir()
    assert builder_main([*argv, "--out", str(tmp_path / "empty")]) == 0
    assert builder_main([*argv, "--out", str(tmp_path / "empty")]) == 0
    assert read_manifest(tmp_path / "empty").counts.indexed > 0


def test_a_killed_distributed_builds_rank_stores_do_not_stop_its_resume(
    make_image_folder, cifar_weights, tmp_path
):
    """A torchrun build's other ranks write beside the source store (``source.rank1``); a killed
    build leaves them, and its resume must not take them for someone else's files."""
    work = tmp_path / "b.work"
    for name in ("source", "source.rank1", "calibration.rank12"):
        (work / name).mkdir(parents=True)
    folder = make_image_folder(classes=3, per_class=8)
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", detector="paper")
    check_config(config)  # accepted
    (work / "source.rankx").mkdir()
    with pytest.raises(ConfigError, match=r"did not write \(source\.rankx\)"):
        check_config(config)


def test_the_holdout_never_takes_a_whole_class():
    """A class of 2 at --holdout-fraction 0.99 used to be held out whole: nothing of it indexed
    (a traceback under v2, a bundle that can never vote for it under the paper's detector)."""
    entries = [Entry(f"c0/{i}.png", 0) for i in range(2)]
    entries += [Entry(f"c1/{i}.png", 1) for i in range(12)]
    for fraction in (0.5, 0.75, 0.96, 0.99):
        mask = holdout_mask(entries, fraction, seed=0)
        assert mask[:2].sum() == 1 and 1 <= mask[2:].sum() <= 11


def test_a_class_of_unreadable_images_is_refused_with_its_name(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=6)
    for path in (folder / "class_02").iterdir():
        path.write_bytes(b"not an image")
    for detector in ("paper", "v2"):
        config = cifar_config(folder, cifar_weights(3), tmp_path / detector, detector=detector)
        with pytest.raises(SourceError, match="class class_02 has no readable image to index"):
            build_bundle(config, progress=False)
        assert not (tmp_path / detector).exists()


def test_images_rewritten_under_their_names_are_not_taken_from_old_chunks(
    make_image_folder, cifar_weights, tmp_path
):
    """The work directory's check hashed the file names only: a rebuild after the images were
    exported again reused the old features."""
    folder = make_image_folder(classes=3, per_class=8)
    work = tmp_path / "work"
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", work_dir=work)
    build_bundle(dataclasses.replace(config, keep_work_dir=True), progress=False)
    image = next((folder / "class_01").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(SourceError, match=r"different build \(content_sha256 differ"):
        build_bundle(config, progress=False)


def test_detector_and_index_options_are_refused_before_the_extraction(
    make_image_folder, cifar_weights, tmp_path, capsys
):
    folder = make_image_folder(classes=3, per_class=8)
    argv = ["--source", str(folder), "--arch", "resnet20", "--weights", str(cifar_weights(3))]
    argv += ["--out", str(tmp_path / "b"), "--workers", "0", "--quiet"]
    for extra, message in (
        (["--detector", "nosuch"], "nosuch"),
        (["--statistic", "foo@last"], "foo"),
        (["--index", "ivf", "--nlist", "64"], "--index ivf --nlist 64 needs as many indexed"),
    ):
        assert builder_main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "b.work").exists()


def test_a_licence_named_like_a_bundle_file_and_a_foreign_staging_dir_are_refused(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=8)
    notice = tmp_path / "lic" / "manifest.json"
    notice.parent.mkdir()
    notice.write_text("licence")
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", license_file=notice)
    with pytest.raises(ConfigError, match="could replace a bundle file"):
        build_bundle(config, progress=False)
    staging = tmp_path / "b.staging"
    staging.mkdir()
    (staging / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a bundle left by an interrupted build"):
        build_bundle(cifar_config(folder, cifar_weights(3), tmp_path / "b"), progress=False)
    assert (staging / "keep.txt").read_text() == "mine"
    (staging / "keep.txt").unlink()
    (staging / "notes").write_text("mine")  # no suffix is no bundle file either
    with pytest.raises(ConfigError, match="is not a bundle left by an interrupted build"):
        build_bundle(cifar_config(folder, cifar_weights(3), tmp_path / "b"), progress=False)
    (staging / "notes").unlink()
    (staging / "model.pth").write_bytes(b"half written")  # an interrupted write: replaced,
    (staging / "NOTICE.txt").write_text("licence")  # its licence notice with it
    notice = tmp_path / "NOTICE.txt"
    notice.write_text("licence")
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", license_file=notice)
    assert build_bundle(config, progress=False)
    assert (tmp_path / "b" / "NOTICE.txt").read_text() == "licence"


def test_a_calibration_source_with_other_classes_is_refused_before_the_extraction(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=8)
    other = make_image_folder(classes=2, per_class=4, name="cal")
    config = cifar_config(folder, cifar_weights(3), tmp_path / "b", calibration_source=other)
    with pytest.raises(SourceError, match=r"missing: class_02; not indexed: none"):
        build_bundle(config, progress=False)
    assert not (tmp_path / "b.work").exists()  # nothing extracted
