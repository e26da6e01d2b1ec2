"""The torchrun path: 2 CPU processes (gloo) build the same bundle as one process."""

import json
import os
import subprocess
import sys

import faiss
import numpy as np

from app.core.bundle import read_manifest
from index_builder.build import SKIPPED_FILE, build_bundle
from index_builder.config import BuildConfig
from index_builder.distributed import launched_by_torchrun

OPTIONS = dict(
    arch="resnet20", k=20, holdout_fraction=0.25, num_workers=0, batch_size=16, chunk_size=8,
    device="cpu",
)  # fmt: skip


def _torchrun_build(folder, weights, out, nproc=2):
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "index_builder",
        "--source", str(folder), "--arch", "resnet20", "--weights", str(weights),
        "--out", str(out), "--k", "20", "--holdout-fraction", "0.25", "--workers", "0",
        "--batch-size", "16", "--chunk-size", "8", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def _vectors(bundle, manifest):
    index = faiss.read_index(str(bundle / manifest.detector.layers[0].index_file))
    return index.reconstruct_n(0, index.ntotal)


def test_two_gloo_processes_build_the_single_process_bundle(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=12, corrupt=1)  # 39 files, 5 chunks of 8
    weights = cifar_weights(3)
    single = tmp_path / "single"
    build_bundle(BuildConfig(source=folder, weights=weights, out=single, **OPTIONS), progress=False)
    many = tmp_path / "many"
    done = _torchrun_build(folder, weights, many)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 alone prints it
    assert summary["bundle"] == str(many)
    # both ranks extracted a share: rank 0 chunks 0, 2, 4; rank 1 chunks 1, 3
    assert "[rank 0/2]: extracted 3 of 5 pending chunks" in done.stderr
    assert "[rank 1/2]: extracted 2 of 5 pending chunks" in done.stderr

    a, b = read_manifest(single), read_manifest(many)
    assert a.class_names == b.class_names
    assert a.counts == b.counts and a.counts.skipped == 3
    # the unreadable images' reasons travel with rank 1's chunks
    assert (single / SKIPPED_FILE).read_text() == (many / SKIPPED_FILE).read_text()
    assert len(json.loads((many / SKIPPED_FILE).read_text())) == 3
    assert a.model == b.model and a.detector == b.detector
    for field in ("n_images", "n_correct", "accuracy", "operating_retention"):
        assert getattr(a.calibration, field) == getattr(b.calibration, field)
    for key, value in a.calibration.thresholds.items():
        assert abs(value - b.calibration.thresholds[key]) < 1e-4, key
    assert abs(a.calibration.threshold - b.calibration.threshold) < 1e-4
    np.testing.assert_array_equal(np.load(single / "labels.npy"), np.load(many / "labels.npy"))
    np.testing.assert_allclose(_vectors(single, a), _vectors(many, b), atol=1e-3, rtol=1e-3)
    layer = a.detector.layers[0]
    processing_a = np.load(single / layer.processing_file)
    processing_b = np.load(many / layer.processing_file)
    assert set(processing_a.files) == set(processing_b.files)
    for name in processing_a.files:
        if processing_a[name].dtype.kind == "f":
            np.testing.assert_allclose(processing_a[name], processing_b[name], atol=1e-3, rtol=1e-3)
        else:
            np.testing.assert_array_equal(processing_a[name], processing_b[name])
    np.testing.assert_allclose(
        np.load(single / "calibration_scores.npy"),
        np.load(many / "calibration_scores.npy"),
        atol=1e-4,
    )
    assert not (tmp_path / "many.work").exists()  # every rank's chunks cleaned up


def test_single_process_runs_are_not_distributed(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun()
    monkeypatch.setenv("RANK", "0")
    assert not launched_by_torchrun()  # torchrun with one process: the plain path
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_by_torchrun()
