"""``bench.service_vs_bare``'s detector stage times on a tiny combined bundle, and its markdown.

Nothing here starts a service or runs the benchmark: the stage timing runs on a bundle built from
a few random images with a random-weight model, the tables on made-up rows.
"""

from __future__ import annotations

from pathlib import Path

from app.core.guard import Guard
from app.core.images import decode_image
from bench.service_vs_bare import stage_table, stage_times
from index_builder.build import BuildConfig, build_bundle


def test_stage_times_cover_every_statistic_kind_of_a_combined_bundle(
    make_image_folder, cifar_weights, tmp_path: Path
) -> None:
    folder = make_image_folder(classes=3, per_class=12)
    config = BuildConfig(
        source=folder,
        arch="resnet20",
        weights=cifar_weights(3),
        out=tmp_path / "b",
        k=10,
        holdout_fraction=0.25,
        num_workers=0,
        batch_size=16,
        chunk_size=8,
        detector="maha-blocks+knn-last-hmp",
    )
    build_bundle(config, progress=False)
    guard = Guard.load(tmp_path / "b", device="cpu")
    pixels = [guard.pixels(decode_image(f.read_bytes())) for f in sorted(folder.rglob("*.png"))]

    timed = stage_times(guard, pixels, batch=4, min_s=0.0)

    kinds = [s.kind for s in guard.detector.statistics]
    assert set(timed["statistic_ms"]) == set(kinds) == {"vote", "mahalanobis", "knn_distance"}
    assert timed["statistic_count"] == {kind: kinds.count(kind) for kind in set(kinds)}
    assert timed["statistic_count"]["mahalanobis"] == 9  # one per residual block of ResNet-20
    assert all(ms > 0 for ms in timed["statistic_ms"].values())
    assert list(timed["by_statistic_ms"]) == guard.detector.names
    assert all(ms > 0 for ms in timed["by_statistic_ms"].values())
    assert timed["model_ms"] > 0 and timed["combination_ms"] > 0
    assert timed["combination"] == "hmp"
    assert timed["batches"] >= 2 and timed["images"] == 4 * timed["batches"]
    total = sum(timed["statistic_ms"].values()) + timed["combination_ms"]
    assert abs(timed["detector_ms"] - total) < 1e-3  # per-kind sums round to 4 decimals

    # the markdown: one row per bundle, "-" under a kind the bundle lacks
    rows = [
        {"role": "a", "bundle": "v2", "torch_threads": 2, **timed},
        {
            "role": "a_prime",
            "bundle": "paper",
            "torch_threads": 2,
            **timed,
            "statistic_ms": {"vote": 0.5},
            "statistic_count": {"vote": 1},
        },
    ]
    lines = stage_table(rows, 4).splitlines()
    assert lines[-2].startswith("| (a) v2 | 2 |")
    assert lines[-1].startswith("| (a') paper | 2 |")
    assert "| 0.5 (1) | - | - |" in lines[-1]
