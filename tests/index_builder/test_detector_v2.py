"""A combined (v2) bundle through the real builder: its parts, its calibration, its integrity."""

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.core.bundle import read_manifest
from app.core.calibration import threshold_for_retention
from app.core.cifar_resnet import cifar_resnet
from app.core.errors import BundleError
from app.core.features import jpeg_squeeze, median_filter_2x2
from app.core.guard import Guard
from app.core.images import decode_image
from app.core.manifest import Manifest
from app.core.models import build_model
from app.core.statistics import DOUBTED_SHARE, NOT_DOUBTED, logit_margins
from index_builder import build, detectors
from index_builder.build import build_bundle, extract_stage, plan_build
from index_builder.cli import main as builder_main
from index_builder.config import BuildConfig
from index_builder.extract import ChunkStore
from tests.conftest import REPO, random_image_bytes, save_state_dict

BLOCKS = [f"layer{stage}.{block}" for stage in (1, 2, 3) for block in range(3)]
PRESET = "maha-blocks+knn-last-hmp"


def _folder(root: Path, classes: int = 3, per_class: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:04d}.png").write_bytes(random_image_bytes(rng, 32, label))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[BuildConfig, Path]:
    """One v2 bundle (the preset's 11 statistics, HMP), its chunks kept for the stage tests."""
    root = tmp_path_factory.mktemp("v2")
    torch.manual_seed(0)
    weights = save_state_dict(cifar_resnet("resnet20", 3), root / "r20.th", nested=True)
    config = BuildConfig(
        source=_folder(root / "imgs"), arch="resnet20", weights=weights, out=root / "bundle",
        detector=PRESET, k=20, holdout_fraction=0.4, num_workers=0, batch_size=32, chunk_size=16,
        work_dir=root / "work", keep_work_dir=True, device="cpu",
    )  # fmt: skip
    build_bundle(config, progress=False)
    return config, config.out


def _build(
    config: BuildConfig, out: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> Manifest:
    """``advguard build`` on the fixture's images and weights into ``out`` with ``args`` added:
    the bundle's manifest, once the build succeeded."""
    code = builder_main([
        "--source", str(config.source), "--arch", "resnet20", "--weights", str(config.weights),
        "--out", str(out), "--k", "20", "--workers", "0", "--quiet",
        "--holdout-fraction", "0.4", "--device", "cpu", *args,
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    return read_manifest(out)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def test_preset_bundle_names_its_statistics_and_loads(built):
    config, bundle = built
    manifest = read_manifest(bundle)
    detector = manifest.detector
    assert detector.combination == "hmp"
    assert detector.statistics is not None
    assert [(s.kind, s.layer, s.k) for s in detector.statistics] == [
        ("vote", "layer3.2", None),
        *[("mahalanobis", block, None) for block in BLOCKS],
        ("knn_distance", "layer3.2", 50),
    ]
    layers = {layer.name: layer for layer in detector.layers}
    assert sorted(layers) == sorted(BLOCKS)
    # only the last block is indexed; every block has its class means and tied covariance
    assert [name for name, layer in layers.items() if layer.index_file] == ["layer3.2"]
    assert all(layer.class_density_file in manifest.files for layer in layers.values())
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    assert guard.detector.names == [
        "vote@layer3.2",
        *[f"mahalanobis@{b}" for b in BLOCKS],
        "knn_distance50@layer3.2",
    ]
    images = [decode_image(p.read_bytes()) for p in sorted(config.source.rglob("*.png"))[::7]]
    verdicts = guard.classify_images(images)
    assert len(verdicts) == len(images) == 9
    for verdict in verdicts:
        assert 0.0 < verdict.score <= 1.0
        assert verdict.accepted == (verdict.score >= manifest.calibration.threshold)


def test_reference_and_threshold_parts_are_disjoint_and_both_used(built):
    config, bundle = built
    manifest = read_manifest(bundle)
    calibration = manifest.calibration
    assert calibration.reference_statistics_file is not None
    assert calibration.threshold_statistics_file is not None
    reference = np.load(bundle / calibration.reference_statistics_file)
    threshold_part = np.load(bundle / calibration.threshold_statistics_file)
    statistics = len(manifest.detector.statistic_specs())
    assert reference.shape == (calibration.n_reference, statistics) and reference.shape[0] > 0
    assert threshold_part.shape == (calibration.n_correct, statistics)
    assert threshold_part.shape[0] > 0

    # the build's own held-out images again (its kept chunks: nothing is recomputed)
    plan = plan_build(config)
    reports = []

    def resume(*args):
        store, report = build._extract(*args)
        reports.append(report)
        return store, report

    extracted = extract_stage(config, plan, False, None, resume)
    assert [(r.chunks_computed, r.chunks_reused) for r in reports] == [(0, 4)]  # 60 images / 16
    part = extracted.cal_reference
    assert part.any() and (~part).any()
    assert part.size == manifest.counts.holdout
    assert calibration.n_images == int((~part).sum())  # the threshold part: every other image
    # each class is split between the two parts
    for label in range(3):
        in_class = extracted.cal_truth == label
        assert (part & in_class).any() and (~part & in_class).any()

    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    values = guard.detector.values(
        extracted.cal_features(guard.detector.layers), extracted.cal_predictions
    )
    correct = extracted.correct
    np.testing.assert_allclose(reference, values[part & correct], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(threshold_part, values[~part & correct], rtol=1e-5, atol=1e-6)
    # no held-out image is in both parts: no row of one part reappears in the other
    assert not any(np.allclose(row, other) for row in reference for other in threshold_part)
    # the loaded detector's reference is the reference part's values
    np.testing.assert_array_equal(guard.detector.reference, np.sort(reference, axis=0))


def test_threshold_statistics_reproduce_the_calibration(built):
    _, bundle = built
    manifest = read_manifest(bundle)
    calibration = manifest.calibration
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    threshold_part = np.load(bundle / str(calibration.threshold_statistics_file))
    combined = guard.detector.combine(threshold_part)
    stored = np.load(bundle / calibration.scores_file)
    np.testing.assert_allclose(combined, stored, rtol=1e-6)
    for key, threshold in calibration.thresholds.items():
        assert threshold_for_retention(combined, float(key)) == pytest.approx(threshold, rel=1e-6)
    assert calibration.threshold == calibration.thresholds["0.98"]
    assert (combined >= calibration.threshold).mean() >= 0.98
    # the honest scores are the whole threshold part (errors included), not the reference part
    honest = np.load(bundle / str(calibration.honest_scores_file))
    assert honest.shape == (calibration.n_images,) and np.isin(stored, honest).all()


def test_tampered_class_density_is_refused(built, tmp_path):
    bundle = _copy(built[1], tmp_path)
    Guard.load(bundle, device="cpu", use_gpu_index=False)  # intact, it loads
    path = bundle / "class_density_layer2_1.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"class_density_layer2_1\.npz"):
        Guard.load(bundle, device="cpu", use_gpu_index=False)


@pytest.mark.parametrize(
    "dropped", ["class_density_layer1_0.npz", "reference_statistics.npy", "index_layer3_2.faiss"]
)
def test_referenced_file_without_checksum_is_refused(built, tmp_path, dropped):
    bundle = _copy(built[1], tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    del data["files"][dropped]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="without a checksum"):
        Guard.load(bundle, device="cpu", use_gpu_index=False)


def test_statistic_on_a_layer_without_class_density_is_invalid(built, tmp_path):
    bundle = _copy(built[1], tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    layer = next(spec for spec in data["detector"]["layers"] if spec["name"] == "layer2.0")
    del data["files"][layer["class_density_file"]]
    layer["class_density_file"] = None
    with pytest.raises(ValidationError, match=r"mahalanobis@layer2\.0 needs the layer's class"):
        Manifest.model_validate(data)
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="class density"):
        Guard.load(bundle, device="cpu", use_gpu_index=False)


def test_cli_statistics_and_combination(built, tmp_path, capsys):
    config, _ = built
    manifest = _build(
        config, tmp_path / "b", capsys, "--statistic", "vote@last",
        "--statistic", "mahalanobis@stages", "--statistic", "knn_distance@last",
        "--class-k", "3", "--combination", "min_p",
    )  # fmt: skip
    assert manifest.detector.combination == "min_p"
    assert [(s.kind, s.layer, s.k) for s in manifest.detector.statistic_specs()] == [
        ("vote", "layer3.2", None),
        ("mahalanobis", "layer1.2", None),
        ("mahalanobis", "layer2.2", None),
        ("mahalanobis", "layer3.2", None),
        ("knn_distance", "layer3.2", 3),
    ]
    guard = Guard.load(tmp_path / "b", device="cpu", use_gpu_index=False)
    assert guard.detector.names[-1] == "knn_distance3@layer3.2"


def test_holdout_too_small_to_split_is_an_error(tmp_path, capsys):
    """One held-out image per class cannot feed both a reference and a threshold part."""
    torch.manual_seed(0)
    weights = save_state_dict(cifar_resnet("resnet20", 3), tmp_path / "r20.th", nested=True)
    code = builder_main([
        "--source", str(_folder(tmp_path / "imgs", per_class=6)), "--arch", "resnet20",
        "--weights", str(weights), "--out", str(tmp_path / "b"), "--k", "5", "--workers", "0",
        "--quiet", "--device", "cpu", "--holdout-fraction", "0.1",
    ])  # fmt: skip
    assert code == 2
    assert "too few held-out images to split" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_layer_aliases_expand_against_the_model():
    model = cifar_resnet("resnet20", 3)
    specs = detectors.parse_statistics(
        ("vote@last", "mahalanobis@stages", "knn_distance@last", "vote@last"), model, "resnet20",
        class_k=7,
    )  # fmt: skip
    assert [(s.kind, s.layer, s.k) for s in specs] == [
        ("vote", "layer3.2", None),
        ("mahalanobis", "layer1.2", None),
        ("mahalanobis", "layer2.2", None),
        ("mahalanobis", "layer3.2", None),
        ("knn_distance", "layer3.2", 7),
    ]  # the repeated vote@last appears once
    blocks = detectors.parse_statistics(("mahalanobis@blocks",), model, "resnet20")
    assert [s.layer for s in blocks] == BLOCKS
    # the paper preset, explicit layers (one vote each) and explicit statistics
    assert detectors.resolve("paper", (), None, (), model, "resnet20") == (
        [detectors.StatisticSpec(kind="vote", layer="layer3.2")],
        "single",
    )
    specs, how = detectors.resolve(None, (), None, ("layer1", "layer3"), model, "resnet20")
    assert [s.layer for s in specs] == ["layer1", "layer3"] and how == "fisher"
    specs, how = detectors.resolve(
        PRESET, ("mahalanobis@last", "vote@last"), None, (), model, "resnet20"
    )
    assert [s.kind for s in specs] == ["mahalanobis", "vote"] and how == "hmp"
    torchvision_model = build_model("resnet18", 3)
    last = detectors.parse_statistics(("vote@last",), torchvision_model, "resnet18")
    assert [s.layer for s in last] == ["layer4.1"]
    for bad in ("vote", "vote@", "density@last"):
        with pytest.raises(ValueError):
            detectors.parse_statistics((bad,), model, "resnet20")
    with pytest.raises(ValueError, match="unknown detector preset"):
        detectors.resolve("v3", (), None, (), model, "resnet20")


def test_margin_bundle_reads_the_logits_without_fitted_files(built, tmp_path, capsys):
    """``margin@logits``: the classifier's last linear layer is hooked and kept in the manifest,
    with no index or class density; the margin the service computes is the one of the logits
    the prediction came from."""
    config, _ = built
    manifest = _build(
        config, tmp_path / "b", capsys,
        "--statistic", "vote@last", "--statistic", "margin@logits", "--combination", "fisher",
    )  # fmt: skip
    assert [(s.kind, s.layer) for s in manifest.detector.statistic_specs()] == [
        ("vote", "layer3.2"),
        ("margin", "linear"),
    ]
    linear = next(layer for layer in manifest.detector.layers if layer.name == "linear")
    assert (linear.index_file, linear.processing_file, linear.class_density_file) == (None,) * 3
    assert linear.input_dim == 3
    guard = Guard.load(tmp_path / "b", device="cpu", use_gpu_index=False)
    pixels = torch.stack(
        [guard.pixels(decode_image(p.read_bytes())) for p in sorted(config.source.rglob("*.png"))]
    )
    batch = guard.infer(pixels)
    with torch.no_grad():
        logits = guard.network(pixels).logits.numpy().astype(np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:]
    evidence = guard.evidence(batch)
    np.testing.assert_allclose(evidence.values[:, 1], top2[:, 1] - top2[:, 0], atol=1e-5)
    # a vote on the logits layer would need an index the builder did not write
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    data["detector"]["statistics"][1]["kind"] = "vote"
    with pytest.raises(ValidationError, match=r"vote@linear needs the layer's index"):
        Manifest.model_validate(data)


def test_logits_alias_names_the_last_linear_layer():
    specs = detectors.parse_statistics(("margin@logits",), cifar_resnet("resnet20", 3), "resnet20")
    assert [(s.kind, s.layer, s.k) for s in specs] == [("margin", "linear", None)]
    tv = detectors.parse_statistics(("margin@logits",), build_model("resnet18", 4), "resnet18")
    assert [s.layer for s in tv] == ["fc"]


def test_default_bundle_reads_the_pixels_and_colour_high_pass_energy(built, tmp_path, capsys):
    """The default preset (v2, selection round 13): the vote, the Mahalanobis distances of the
    three stage outputs, the logit margin, the suspect JPEG margin and two pixel statistics,
    Mahalanobis distances over the 9 RGB and the 6
    colour-channel high-pass energies, each fitted like any layer's class density on the
    indexed images (no index), whose values are the distances of the energies the feature
    network computes; a tampered density file is refused."""
    config, _ = built
    manifest = _build(config, tmp_path / "b", capsys)
    assert manifest.detector.combination == "hmp"
    assert [(s.kind, s.layer) for s in manifest.detector.statistic_specs()] == [
        ("vote", "layer3.2"),
        *[("mahalanobis", stage) for stage in ("layer1.2", "layer2.2", "layer3.2")],
        ("margin", "linear"),
        ("mahalanobis", "pixels.highpass"),
        ("mahalanobis", "pixels.chromahighpass"),
        ("suspect_margin", "jpeg.logits"),
    ]
    for column, (name, width) in enumerate([("highpass", 9), ("chromahighpass", 6)], start=5):
        layer = next(s for s in manifest.detector.layers if s.name == f"pixels.{name}")
        assert (layer.input_dim, layer.index_file) == (width, None)
        assert layer.class_density_file == f"class_density_pixels_{name}.npz"
        _check_pixel_density(config, tmp_path / "b", f"pixels.{name}", column=column)
    path = tmp_path / "b" / "class_density_pixels_chromahighpass.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"class_density_pixels_chromahighpass\.npz"):
        Guard.load(tmp_path / "b", device="cpu", use_gpu_index=False)


def _check_pixel_density(config: BuildConfig, bundle: Path, layer: str, column: int) -> None:
    """A pixel pseudo-layer's class density is fitted on the indexed images only (their class
    means and tied covariance, brute force), and the statistic in ``column`` of the bundle's
    evidence is minus the squared distance of the layer's energies to the predicted class's
    mean."""
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)

    def energies(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = torch.stack([guard.pixels(decode_image(p.read_bytes())) for p in paths])
        batch = guard.infer(pixels)
        values = guard.evidence(batch).values[:, column]
        return batch.features[layer].astype(np.float64), batch.predictions, values

    indexed = json.loads((bundle / "sources.json").read_text())
    x, _, _ = energies([config.source / name for name in indexed])
    labels = np.array([int(name.split("/")[0].split("_")[1]) for name in indexed])
    means = np.stack([x[labels == c].mean(axis=0) for c in range(3)])
    covariance = np.cov((x - means[labels]).T, bias=True)
    density = np.load(bundle / f"class_density_{layer.replace('.', '_')}.npz")
    np.testing.assert_allclose(density["means"], means, rtol=1e-9)
    whitener = density["whitener"]
    np.testing.assert_allclose(whitener.T @ covariance @ whitener, np.eye(x.shape[1]), atol=1e-6)
    energy, predicted, values = energies(sorted(config.source.rglob("*.png")))
    centred = energy - means[predicted]
    expected = -np.einsum("nd,de,ne->n", centred, np.linalg.inv(covariance), centred)
    np.testing.assert_allclose(values, expected, rtol=1e-4)


def _second_pass_margins(
    config: BuildConfig, bundle: Path, transform: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """The loaded bundle's statistic values for the fixture's images, and the margin of each
    predicted class on the logits of the ``transform``-ed images, computed apart."""
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    paths = sorted(config.source.rglob("*.png"))
    pixels = torch.stack([guard.pixels(decode_image(p.read_bytes())) for p in paths])
    batch = guard.infer(pixels)
    with torch.no_grad():
        logits = guard.network(transform(pixels)).logits.numpy()
    return guard.evidence(batch).values, logit_margins(logits, batch.predictions)


@pytest.mark.parametrize(
    ("preset", "layer", "transform"),
    [
        ("v2-flip", "flip.logits", lambda pixels: pixels.flip(-1)),
        ("v2-median", "median.logits", median_filter_2x2),
        ("maha-stages+margin+hp+cn+jq-hmp", "jpeg.logits", jpeg_squeeze),  # round 12's +jq
    ],
)
def test_a_second_pass_preset_reads_its_margin(built, tmp_path, capsys, preset, layer, transform):
    """``--detector v2-flip`` / ``v2-median`` / round 12's ``+cn+jq`` candidate is round 7's v2
    plus ``margin@flip.logits`` / ``margin@median.logits`` / ``margin@jpeg.logits``: no fitted
    file, the layer's width is the number of classes, and its values are the margin of the
    predicted class on the mirrored / median-filtered / JPEG-squeezed image's logits."""
    config, _ = built
    manifest = _build(config, tmp_path / "b", capsys, "--detector", preset)
    assert [(s.kind, s.layer) for s in manifest.detector.statistic_specs()] == [
        ("vote", "layer3.2"),
        ("mahalanobis", "layer1.2"),
        ("mahalanobis", "layer2.2"),
        ("mahalanobis", "layer3.2"),
        ("margin", "linear"),
        ("mahalanobis", "pixels.highpass"),
        ("mahalanobis", "pixels.chromahighpass"),
        ("margin", layer),
    ]
    second = next(s for s in manifest.detector.layers if s.name == layer)
    assert (second.input_dim, second.index_file, second.class_density_file) == (3, None, None)
    values, expected = _second_pass_margins(config, tmp_path / "b", transform)
    np.testing.assert_allclose(values[:, 7], expected, rtol=1e-5, atol=1e-6)


def test_a_suspect_jpeg_margin_bundle_runs_the_jpeg_pass_for_its_suspects_alone(
    built, tmp_path, capsys
):
    """Round 13's ``+sjq``: the manifest lists ``suspect_margin@jpeg.logits`` without a gate;
    the loaded guard's network defers the JPEG pass and runs it for the queries the detector
    suspects (those whose other statistics combine below its gate) and no other; its scores and
    values are those of a network that runs the pass for every query, the suspect margin the
    predicted class's margin on the JPEG-squeezed image, shown as not read elsewhere."""
    config, _ = built
    bundle = tmp_path / "sjq"
    manifest = _build(config, bundle, capsys, "--detector", "maha-stages+margin+hp+cn+sjq-hmp")
    suspect = manifest.detector.statistic_specs()[-1]
    assert (suspect.kind, suspect.layer, suspect.gate) == ("suspect_margin", "jpeg.logits", None)
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    assert guard.network.deferred == ("jpeg.logits",)
    paths = sorted(config.source.rglob("*.png"))
    pixels = torch.stack([guard.pixels(decode_image(p.read_bytes())) for p in paths])
    seen: list[int] = []
    hook = guard.network.model.register_forward_hook(lambda _m, i, _o: seen.append(len(i[0])))
    batch = guard.infer(pixels)
    assert "jpeg.logits" not in batch.features and seen == [len(paths)]
    evidence = guard.evidence(batch)
    hook.remove()
    values, expected = _second_pass_margins(config, bundle, jpeg_squeeze)
    suspects = guard.detector.suspects(evidence.values)
    assert 0 < suspects.sum() < len(paths)
    assert seen == [len(paths), int(suspects.sum())]  # the JPEG pass: the suspects only
    np.testing.assert_allclose(values[suspects, -1], expected[suspects], rtol=1e-5, atol=1e-6)
    assert (values[~suspects, -1] == NOT_DOUBTED).all()
    guard.network.deferred = ()  # the pass for every query: the same scores
    everyone = guard.infer(pixels)
    assert "jpeg.logits" in everyone.features
    np.testing.assert_allclose(guard.score(everyone), evidence.scores, rtol=1e-6)


def test_the_median_preset_is_the_flip_presets_statistics_with_the_median_margin():
    """``v2-median`` (round 10's best at any cost) reads what ``v2-flip`` reads, the median
    margin in place of the flip margin, combined the same way."""
    flip, median = detectors.PRESETS["v2-flip"], detectors.PRESETS["v2-median"]
    assert median.statistics[:-1] == flip.statistics[:-1]
    assert (flip.statistics[-1], median.statistics[-1]) == (
        detectors.FLIP_STATISTIC,
        detectors.MEDIAN_STATISTIC,
    )
    assert median.combination == flip.combination == "hmp"
    assert detectors.forward_passes(median.statistics) == 2


def test_the_jpeg_preset_is_round_twelves_best_at_any_cost():
    """``v2-jpeg`` is the candidate selection round 12 chose at any cost
    (evaluation/results/selection-12/selection.json): the vote, the stage distances, the colour
    noise and the JPEG margin, harmonic mean; a second pass for every image."""
    chosen = json.loads((REPO / "evaluation/results/selection-12/selection.json").read_text())
    assert chosen["v2-jpeg"] == "maha-stages+cn+jq-hmp"
    assert detectors.PRESETS["v2-jpeg"] == detectors.candidate_presets()[chosen["v2-jpeg"]]
    assert detectors.PRESETS["v2-jpeg"].statistics[-1] == detectors.JPEG_STATISTIC
    assert detectors.forward_passes(detectors.PRESETS["v2-jpeg"].statistics) == 2


def test_a_doubt_margin_bundle_fits_its_gate_and_mirrors_only_in_doubt(built, tmp_path, capsys):
    """``doubt_margin@flip.logits``: the builder fits its gate on the reference part (a fifth
    of those images fall below it) and records it with the first pass's logits layer; the
    loaded guard's network mirrors only the doubted queries, with the same evidence as a full
    mirrored pass; a manifest without the gate is refused."""
    config, _ = built
    manifest = _build(
        config, tmp_path / "b", capsys,
        "--statistic", "vote@last", "--statistic", "margin@logits",
        "--statistic", "doubt_margin@flip.logits",
    )  # fmt: skip
    spec = manifest.detector.statistic_specs()[2]
    assert (spec.kind, spec.layer, spec.first_logits) == ("doubt_margin", "flip.logits", "linear")
    assert spec.gate is not None and np.isfinite(spec.gate)
    assert manifest.calibration.reference_statistics_file is not None
    reference = np.load(tmp_path / "b" / manifest.calibration.reference_statistics_file)[:, 2]
    assert abs((reference < NOT_DOUBTED).mean() - DOUBTED_SHARE) <= 1 / reference.size
    guard = Guard.load(tmp_path / "b", device="cpu", use_gpu_index=False)
    assert guard.network.mirror_below is not None and guard.network.mirror_below > spec.gate
    paths = sorted(config.source.rglob("*.png"))
    pixels = torch.stack([guard.pixels(decode_image(p.read_bytes())) for p in paths])
    gated = guard.evidence(guard.infer(pixels))
    guard.network.mirror_below = None
    full = guard.evidence(guard.infer(pixels))
    np.testing.assert_allclose(gated.values, full.values, rtol=1e-5)
    np.testing.assert_allclose(gated.scores, full.scores, rtol=1e-9)
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    data["detector"]["statistics"][2]["gate"] = None
    with pytest.raises(ValidationError, match="have a gate"):
        Manifest.model_validate(data)


@pytest.mark.parametrize(
    ("second", "layer"),
    [("doubt_margin@flip.logits", "flip.logits"), ("margin@median.logits", "median.logits")],
)
def test_the_builder_runs_second_passes_on_the_held_out_images_only(
    built, tmp_path, monkeypatch, second, layer
):
    """A detector that reads ``flip.logits`` or ``median.logits`` costs the build a second
    pass over the held-out images only (calibration reads them; nothing fitted on the indexed
    images does): the kept chunks hold those logits on exactly the held-out rows, and the bundle
    is byte for byte the one a build that runs the second pass on every image writes."""
    config, _ = built
    statistics = ("vote@last", "margin@logits", second)
    mirrored_rows: list[int] = []

    def counting(config: BuildConfig, entries: list) -> np.ndarray:
        chosen = build.holdout_mask(entries, config.holdout_fraction, config.seed)
        mirrored_rows.append(int(chosen.sum()))
        return chosen

    def every(config: BuildConfig, entries: list) -> np.ndarray:
        return np.ones(len(entries), dtype=bool)

    bundles = {}
    for name, rule in (("held_out", counting), ("every", every)):
        monkeypatch.setattr(build, "second_pass_entries", rule)
        run = replace(
            config, detector=None, statistics=statistics, out=tmp_path / name,
            work_dir=tmp_path / f"{name}.work", keep_work_dir=True,
        )  # fmt: skip
        build_bundle(run, progress=False)
        bundles[name] = run
    assert mirrored_rows and 0 < mirrored_rows[0] < 60

    plan = plan_build(bundles["held_out"])
    store = plan.work_dir / "source"
    held_out = build.holdout_mask(plan.entries, config.holdout_fraction, config.seed)
    chunks = ChunkStore(store, len(plan.entries), config.chunk_size, list(plan.network.layers))
    parts = [chunks.load(c, f"features_{layer}") for c in range(chunks.n_chunks)]
    flipped = np.concatenate(parts)
    assert np.isfinite(flipped[held_out]).all()
    assert np.isnan(flipped[~held_out]).all()

    written = sorted(p.name for p in bundles["every"].out.iterdir())
    assert sorted(p.name for p in bundles["held_out"].out.iterdir()) == written
    for name in written:
        if name == "manifest.json":
            continue
        left = (bundles["held_out"].out / name).read_bytes()
        assert left == (bundles["every"].out / name).read_bytes(), name
    manifests = [read_manifest(bundles[k].out) for k in ("held_out", "every")]
    assert manifests[0].detector == manifests[1].detector
    assert manifests[0].calibration == manifests[1].calibration


def test_the_default_is_round_thirteens_choice_and_v2_dflip_round_elevens():
    """``v2`` is the candidate selection round 13 chose (evaluation/results/selection-13/
    selection.json), one pass and the JPEG pass for the suspect fifth; ``v2-dflip`` keeps the
    candidate round 11 chose, the default before it."""
    for preset, round_ in (("v2", 13), ("v2-dflip", 11)):
        path = REPO / f"evaluation/results/selection-{round_}/selection.json"
        chosen = json.loads(path.read_text())["chosen"]
        assert detectors.PRESETS[preset] == detectors.candidate_presets()[chosen]
        assert detectors.forward_passes(detectors.PRESETS[preset].statistics) == 1.2
    assert detectors.PRESETS["v2"].statistics[-1] == detectors.SUSPECT_JPEG_STATISTIC
    assert detectors.PRESETS["v2-dflip"].statistics[-1] == detectors.DOUBT_STATISTIC
