"""bench/gpu/run.sh: the dry run end to end, its result files, and its argument handling.

The dry run is the whole GPU script on the CPU with tiny sizes (``bench.gpu.run.DRY``): every
step runs the code the H200 will run, so what can break there without a GPU breaks here first.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.core import search
from app.core.bundle import read_manifest
from app.core.guard import Guard
from bench.gpu import run as gpu_run
from bench.gpu import synthetic
from tests.conftest import DEMO_BUNDLE

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "bench" / "gpu" / "run.sh"


def _run_sh(*args: str, out: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(
        ["bash", str(RUN_SH), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_writes_every_result_in_its_format(tmp_path: Path) -> None:
    out = tmp_path / "out"  # as on the device machine: $OUT names the result directory
    done = _run_sh(
        "--dry-run",
        "--work",
        str(tmp_path / "work"),
        "--service-env",
        "ADVGUARD_STATEFUL_SECRET=dry-run-secret",
        "--also",
        "ADVGUARD_MAX_WAIT_MS=1",
        out=out,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "run.log", "summary.md"]
    assert not (tmp_path / "work").exists()  # scratch removed
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["device"] == "cpu"
    assert results["sizes"]["arch"] == gpu_run.DRY.arch
    steps = results["steps"]
    assert list(steps) == list(gpu_run.STEPS)
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(
        gpu_run.STEPS, "ok"
    )
    assert all(step["seconds"] >= 0 for step in steps.values())
    _check_environment(steps["environment"]["results"])
    _check_parity(steps["parity"]["results"])
    _check_search(steps["search"]["results"])
    _check_builder(steps["builder"]["results"])
    _check_service(steps["service"]["results"])
    _check_host(steps["host"]["results"])
    summary = (out / "summary.md").read_text()
    for name in gpu_run.STEPS:
        assert f"## {name}: ok" in summary
    assert "| cpu model + torch search on cpu | 48 / 48 |" in summary
    assert "results in" in (out / "run.log").read_text()


def _check_environment(env: dict[str, Any]) -> None:
    assert set(env["imports"].values()) == {"ok"}
    assert env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["gpu"] is None and env["faiss_gpus"] == 0


def _check_parity(parity: dict[str, Any]) -> None:
    assert parity["passed"] and parity["images"] == gpu_run.DRY.parity_images
    reference, *compared = parity["configurations"]
    assert reference["device"] == "cpu" and reference["search_backend"] == "faiss"
    assert [row["search_backend"] for row in compared] == ["faiss", "torch"]
    for row in compared:
        assert row["decisions_identical"] == row["images"] == 48
        assert row["statistics_within_tolerance"] and row["passed"]
        assert set(row["statistics_max_moved_over_spread"]) >= {"vote@layer3.2"}
        allowed = row["statistics_max_allowed_over_spread"]
        assert set(allowed) == set(row["statistics_max_moved_over_spread"])
        assert min(allowed.values()) >= parity["statistic_tolerance_of_spread"]
        assert allowed["vote@layer3.2"] > parity["statistic_tolerance_of_spread"]  # its steps


def _check_search(found: dict[str, Any]) -> None:
    assert found["passed"]
    demo = found["demo_bundle"]
    assert demo["k"] == 1000 and demo["rows"] == 45_000 and demo["queries"] == 48
    for row in demo["against_cpu_flat"].values():
        assert row["identical_neighbours"] and row["ids_unexplained"] == 0
        assert row["max_relative_distance_error"] <= 1e-4
    scale = found["scale"]
    assert (scale["n"], scale["dim"], scale["k"]) == (4000, 64, 50)
    assert set(scale["timings"]) == {"torch (cpu)", "faiss-cpu (cpu)"}
    for timing in scale["timings"].values():
        assert list(timing["batches"]) == ["1", "8", "16"]
        assert all(row["per_query_ms_median"] > 0 for row in timing["batches"].values())


def _check_builder(builder: dict[str, Any]) -> None:
    assert builder["images"] == gpu_run.DRY.builder_images and builder["workers"] == 2
    for key in ("forward_images_per_second_before", "builder_extract_images_per_second"):
        assert builder[key] > 0
    assert builder["builder_over_forward"] > 0


def _check_host(host: dict[str, Any]) -> None:
    """Each preparing step and each worker count, alone and beside the busy thread."""
    preparing = host["preparing_median_ms"]
    assert len(preparing) == 5
    assert all(ms["alone"] > 0 and ms["busy"] > 0 for ms in preparing.values())
    assert list(host["fingerprint_ms_per_query"]) == [
        str(count) for count in gpu_run.DRY.host_processes
    ]
    for ms in host["fingerprint_ms_per_query"].values():
        assert ms["alone_ms"] > 0 and ms["busy_ms"] > 0
    on_device = host["fingerprint_on_device"]  # the dry run's device is the CPU
    assert on_device["device"] == "cpu" and on_device["queries"] > 0
    assert on_device["identical"] == on_device["queries"]


def _check_service(service: dict[str, Any]) -> None:
    assert service["index_rows"] == gpu_run.DRY.service_rows
    assert service["errors"] == []
    assert service["image_size"] == "32x32"
    assert [row["max_batch_size"] for row in service["guard_on_sweep"]] == [4, 16]
    assert service["best_max_batch_size"] in (4, 16)
    assert service["compared_max_batch_size"] == 16  # the sweep's largest, for every service
    assert service["guard_off"]["env"]["ADVGUARD_MAX_BATCH_SIZE"] == "16"
    for key in ("a_images_per_s", "a_minus_images_per_s", "b_images_per_s", "c_images_per_s"):
        assert service[key] > 0
    unscreened = service["guard_without_screening"]
    for run in [*service["guard_on_sweep"], service["guard_off"], unscreened]:
        assert set(run["saturation"]["statuses"]) == {"200"}
    assert service["guard_off"]["env"]["ADVGUARD_GUARD_ENABLED"] == "false"
    assert unscreened["env"]["ADVGUARD_GUARD_ENABLED"] == "true"
    assert unscreened["env"]["ADVGUARD_STATEFUL_ENABLED"] == "false"
    assert unscreened["env"]["ADVGUARD_MAX_BATCH_SIZE"] == "16"
    assert service["client_ids"] == 1000
    (also,) = service["guard_on_also"]  # --also: one more guarded service, (a)'s batch size
    assert also["setting"] == "ADVGUARD_MAX_WAIT_MS=1"
    assert also["env"]["ADVGUARD_MAX_WAIT_MS"] == "1"
    assert also["env"]["ADVGUARD_MAX_BATCH_SIZE"] == "16"
    assert set(also["saturation"]["statuses"]) == {"200"}
    for run in [*service["guard_on_sweep"], service["guard_off"], unscreened, also]:
        assert run["env"]["ADVGUARD_STATEFUL_SECRET"] == "dry-run-secret"  # --service-env
    best = next(
        row
        for row in service["guard_on_sweep"]
        if row["max_batch_size"] == service["compared_max_batch_size"]
    )
    spent = best["saturation"]["screening_ms_per_query"]
    assert set(spent) == {"pixels", "hash", "match", "record"} and spent["hash"] > 0
    assert unscreened["saturation"]["screening_busy"] == 0  # no screening, no time
    assert service["guard_off"]["env"]["ADVGUARD_SEARCH_BACKEND"] == "torch"
    variants = service["execution"]["variants"]
    assert [(v["precision"], v["channels_last"]) for v in variants] == list(gpu_run_variants())
    kept = service["execution"]["kept"]
    kept_row = next(
        v
        for v in variants
        if (v["precision"], v["channels_last"]) == (kept["precision"], kept["channels_last"])
    )
    assert kept_row["decisions_identical"] == service["execution"]["images"]
    env = service["guard_off"]["env"]
    assert env["ADVGUARD_MODEL_PRECISION"] == kept["precision"]
    assert set(service["detector_stages"]["statistic_ms"]) == {
        "vote",
        "margin",
        "mahalanobis",
        "suspect_margin",
    }


def gpu_run_variants() -> list[tuple[str, bool]]:
    from bench.gpu.service_check import VARIANTS

    return list(VARIANTS)


def test_help_and_bad_arguments_cost_nothing(tmp_path: Path) -> None:
    """run.sh validates its options before installing or importing torch."""
    shown = _run_sh("--help", out=tmp_path)
    assert shown.returncode == 0
    assert "--dry-run" in shown.stdout and "--only" in shown.stdout and "--target" in shown.stdout
    for bad, message in (
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--only", "parity,nope"], "unknown steps ['nope']"),
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--out"], "--out needs a value"),
        (["--python"], "--python needs a value"),
        (["--max-batch-sizes", "0,64"], "expected positive integers"),
        (["--execution", "fp8"], "expected one of"),
        (["--also", "MAX_BATCH=3"], "expected ADVGUARD_NAME=VALUE"),
        (["--service-env", "ADVGUARD_X"], "expected ADVGUARD_NAME=VALUE"),
    ):
        done = _run_sh(*bad, out=tmp_path)
        assert done.returncode == 2, bad
        assert message in done.stderr, (bad, done.stderr)
    assert not any(tmp_path.iterdir())  # nothing written


def test_parse_args_orders_steps_and_defaults_the_out_dir() -> None:
    args = gpu_run.parse_args(["--only", "service, parity"])
    assert args.only == ("parity", "service") and args.out == gpu_run.DEFAULT_OUT
    assert gpu_run.parse_args([]).only == gpu_run.STEPS
    assert not gpu_run.parse_args([]).dry_run
    service = gpu_run.parse_args(
        ["--max-batch-sizes", "64,128", "--execution", "bf16+cl", "--also", "ADVGUARD_A_B=x=1"]
    )
    assert service.max_batch_sizes == (64, 128) and service.execution == ("bf16", True)
    assert service.also == [("ADVGUARD_A_B", "x=1")] and service.service_env == []


def test_full_run_without_cuda_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_run.main(["--out", str(tmp_path / "out")]) == 2
    assert "use --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_steps_are_isolated_and_held_to_the_budget(tmp_path: Path) -> None:
    args = gpu_run.parse_args(["--dry-run", "--out", str(tmp_path), "--budget-s", "100"])
    run = gpu_run.Run(args, gpu_run.DRY, "cpu")

    def broken() -> tuple[dict[str, Any], str]:
        raise RuntimeError("no kernel image for this device")

    run.step("parity", broken)
    run.step("search", lambda: ({"passed": True}, "| a table |"))
    run.step("builder", lambda: ({"errors": ["one run failed"]}, "| kept |"))
    run.budget_s = 0.0  # spent: the next step must not start
    run.step("service", lambda: pytest.fail("ran past the budget"))
    saved = json.loads((tmp_path / "results.json").read_text())
    steps = saved["steps"]
    assert steps["parity"]["status"] == "error"
    assert "RuntimeError: no kernel image" in steps["parity"]["error"]
    assert "Traceback" in steps["parity"]["traceback"]
    assert steps["search"] == {"status": "ok", "results": {"passed": True}, "seconds": 0.0}
    assert steps["builder"]["status"] == "partial"
    assert steps["service"]["status"] == "skipped"
    summary = (tmp_path / "summary.md").read_text()
    assert "## parity: error" in summary and "RuntimeError" in summary
    assert "## search: ok" in summary and "| a table |" in summary
    assert "## builder: partial" in summary and "| kept |" in summary
    assert "## service: skipped" in summary and "left of the budget" in summary


def test_enlarged_bundle_loads_verifies_and_searches_its_new_index(tmp_path: Path) -> None:
    manifest = read_manifest(DEMO_BUNDLE)
    dims = next(layer.output_dim for layer in manifest.detector.layers if layer.index_file)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, dims)).astype(np.float32)
    labels = rng.integers(0, 1000, 3000)
    out = synthetic.enlarge_bundle(DEMO_BUNDLE, tmp_path / "big", vectors, labels)
    enlarged = read_manifest(out)
    assert enlarged.counts.indexed == 3000 and sum(enlarged.counts.indexed_per_class) == 3000
    assert enlarged.name == "cifar10-resnet20-3000"
    guard = Guard.load(out, device="cpu", search_backend="torch")
    vote = guard.detector.statistics[0]
    assert vote.kind == "vote"
    assert search.index_size(vote.layer.index) == 3000  # type: ignore[union-attr]
    np.testing.assert_array_equal(search.stored_vectors(vote.layer.index), vectors)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="need"):
        synthetic.enlarge_bundle(DEMO_BUNDLE, tmp_path / "bad", vectors[:, :3], labels)


def test_synthetic_jpegs_have_the_asked_size_and_folder_layout(tmp_path: Path) -> None:
    from app.core.images import decode_image

    (first, *_) = synthetic.jpegs(2, (500, 375))
    assert decode_image(first).size == (500, 375)
    root = synthetic.jpeg_folder(tmp_path / "f", images=7, classes=2, size=(40, 30), distinct=4)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert len(files) == 7 and {f.split("/")[0] for f in files} == {"class_00", "class_01"}


def test_a_service_that_fails_is_recorded_and_the_others_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A service that does not start on the GPU machine must not cost the runs that did, nor
    the in-process figures measured before it."""
    from argparse import Namespace

    from bench.gpu import service_check

    def broken(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("the service did not start")

    monkeypatch.setattr(service_check, "run_service", broken)
    env = {"ADVGUARD_MAX_BATCH_SIZE": "64"}
    row = service_check.served(env, Namespace(), [], "(a)", 0.0)
    assert row["env"] == env and row["error"] == "RuntimeError: the service did not start"
    assert row["wall_seconds"] >= 0
    level = {"throughput_images_per_s": 10.0, "latency_ms_p50": 1, "latency_ms_p99": 2}
    level |= {"mean_batch_size": 3.0, "statuses": {"200": 5}}
    results = {
        "bundle": "b",
        "device": "cuda",
        "index_device": "gpu",
        "images": 4,
        "image_size": "224x224",
        "concurrency": 8,
        "seconds_per_level": 1.0,
        "execution": {
            "images": 4,
            "batch_size": 2,
            "variants": [],
            "kept": {"precision": "fp32", "channels_last": False},
        },
        "in_process": {
            "limit": {"batch_size": 2},
            "limit_model_only": {"batch_size": 2, "images_per_s": 9.0},
        },
        "detector_stages": {
            "batch_size": 2,
            "model_ms": 1.0,
            "statistic_ms": {"vote": 0.5},
            "combination_ms": 0.1,
        },
        "guard_on_sweep": [
            {"max_batch_size": 32, **row},
            {"max_batch_size": 64, "saturation": level},
        ],
        "best_max_batch_size": 64,
        "compared_max_batch_size": 64,
        "guard_off": {**row},
        "guard_without_screening": {**row},
        "client_ids": 1000,
        "a_images_per_s": 10.0,
        "a_minus_images_per_s": None,
        "b_images_per_s": None,
        "c_images_per_s": 12.0,
        "a_over_b": None,
        "a_minus_over_b": None,
        "a_over_c": 10.0 / 12.0,
    }
    text = service_check.table(results)
    assert "| 32 | error: RuntimeError: the service did not start |" in text
    assert "| 64 | 10.0 |" in text
    assert "a / b = -, a- / b = -, a / c = 83.3%" in text
    assert "RuntimeError: the service did not start." in text


def test_full_sizes_are_the_issues_and_fit_eight_minutes() -> None:
    """The GPU run measures what issue 15 names, and its budget (every step's estimate inside
    it) leaves the wheel install and Python's start-up inside 8 minutes."""
    full = gpu_run.FULL
    assert full.parity_images == 2000
    assert (full.search_rows, full.search_dim, full.search_k) == (1_281_167, 256, 1000)
    assert full.search_batches == (1, 64, 256)
    assert (full.arch, full.service_image_size, full.service_rows) == ("resnet50", 224, 1_281_167)
    assert len(full.max_batch_sizes) >= 3  # a sweep
    assert (full.builder_images, full.builder_image_size) == (20_000, (500, 375))
    assert full.builder_workers == 14
    assert sum(seconds for _, seconds in full.estimates_s) <= full.budget_s <= 8 * 60 - 45
    assert [name for name, _ in full.estimates_s] == list(gpu_run.STEPS)
    assert [name for name, _ in gpu_run.DRY.estimates_s] == list(gpu_run.STEPS)
