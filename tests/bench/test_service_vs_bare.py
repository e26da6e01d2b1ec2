"""``bench.service_vs_bare``'s detector stage times on a tiny combined bundle, its markdown, and
its load generator against a minimal HTTP server.

Nothing here starts a service or runs the benchmark: the stage timing runs on a bundle built from
a few random images with a random-weight model, the tables on made-up rows.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from app.core.guard import Guard
from app.core.images import decode_image
from bench.common import multipart_request
from bench.service_load import load_level, screening_means
from bench.service_vs_bare import (
    also_envs,
    also_setting,
    interleaved_ratios,
    interleaved_table,
    issue_target_line,
    stage_table,
    stage_times,
)
from index_builder.build import build_bundle
from index_builder.config import BuildConfig


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


def test_stage_times_charge_a_suspect_margin_its_deferred_pass(
    make_image_folder, cifar_weights, tmp_path: Path
) -> None:
    """Round 13's suspect JPEG margin: the network leaves its JPEG pass out of the model stage
    (it failed here with a KeyError before the stage timing ran it for the suspects), and the
    statistic's time includes that pass."""
    folder = make_image_folder(classes=3, per_class=12)
    config = BuildConfig(
        source=folder, arch="resnet20", weights=cifar_weights(3), out=tmp_path / "b", k=10,
        holdout_fraction=0.25, num_workers=0, batch_size=16, chunk_size=8,
        detector="maha-stages+margin+sjq-hmp",
    )  # fmt: skip
    build_bundle(config, progress=False)
    guard = Guard.load(tmp_path / "b", device="cpu")
    assert guard.network.deferred == ("jpeg.logits",)
    pixels = [guard.pixels(decode_image(f.read_bytes())) for f in sorted(folder.rglob("*.png"))]

    timed = stage_times(guard, pixels, batch=8, min_s=0.0)

    assert timed["statistic_count"]["suspect_margin"] == 1
    assert timed["by_statistic_ms"]["suspect_margin@jpeg.logits"] > 0


def _interleaved_service(images_per_s: float, cpu_ms: float) -> dict[str, object]:
    return {
        "throughput_images_per_s": images_per_s,
        "cpu_ms_per_request": cpu_ms,
        "per_round_images_per_s": [images_per_s, images_per_s],
        "stateful_stage_ms_mean": 0.0,
        "levels": [],
    }


def test_interleaved_ratios_read_throughput_and_cpu_against_the_unguarded_service() -> None:
    screened = [  # two load slices of (a), as load_level reports them
        {"screening_ms_per_query": {"pixels": 0.01, "hash": 0.1, "match": 0.12, "record": 0.02}},
        {"screening_ms_per_query": {"pixels": 0.03, "hash": 0.08, "match": 0.1, "record": 0.0}},
    ]
    together = {
        "a": {
            **_interleaved_service(240.0, 8.0),
            "screening_ms_per_query": screening_means(screened),
        },
        "a_minus": _interleaved_service(300.0, 6.4),
        "b": _interleaved_service(400.0, 5.6),
    }
    run = interleaved_ratios(together)
    assert run["throughput_over_b"] == {"a": 0.6, "a_minus": 0.75, "b": 1.0}
    assert run["b_cpu_over_cpu"] == {"a": 0.7, "a_minus": 0.875, "b": 1.0}

    variant = {
        "torch_threads": 2,
        "interleaved": run,
        "a_over_b": 0.5,
        "a_unscreened_over_b": 0.9,
        "a_prime_over_b": None,
    }
    args = argparse.Namespace(rounds=2, slice=5.0, concurrency=[8, 32], clients=1000)
    table = interleaved_table([variant], args).splitlines()
    assert "2 slices of 5 s each at concurrency 32" in table[0]
    assert "1,000 client ids" in table[0]
    assert table[-3].startswith(
        "| (a) guard on | 2 | 240.0 | 60.0% | 60.0% (60.0%-60.0%): missed | 8.0 | 70.0% |"
    )
    assert "| 0.02 / 0.09 / 0.11 / 0.01 |" in table[-3]  # the screening's parts, slice means
    assert "| - |" in table[-2]  # (a-) screens nothing
    assert "| 87.5% |" in table[-2]  # (a-) by CPU per request: shown, not judged
    assert table[-1].startswith(
        "| (b) guard off | 2 | 400.0 | 100.0% | 100.0% (100.0%-100.0%) | 5.6 | 100.0% |"
    )

    line = issue_target_line([variant], "paper")
    assert (
        "interleaved: (a) 60.0% of the throughput (60.0% (60.0%-60.0%) by round: missed), "
        "70.0% by CPU" in line
    )
    assert "no verdict): (a) 50.0%, (a-) without query screening 90.0%" in line
    assert interleaved_table([{**variant, "interleaved": None}], args).startswith(
        "Interleaved comparison: not run"
    )


def test_also_adds_the_guarded_service_with_a_setting_changed_to_the_interleaved_run() -> None:
    """``--also ADVGUARD_NAME=VALUE``: (a) with that setting, beside the others, labelled by it."""
    guarded = {"ADVGUARD_BUNDLE": "b", "ADVGUARD_SEARCH_THREADS": "1"}
    assert also_envs(argparse.Namespace(also=None), guarded) == {}
    settings = ["ADVGUARD_SEARCH_THREADS=2", "ADVGUARD_MAX_BATCH_SIZE=64"]
    assert also_envs(argparse.Namespace(also=settings), guarded) == {
        "a+ADVGUARD_SEARCH_THREADS=2": {"ADVGUARD_BUNDLE": "b", "ADVGUARD_SEARCH_THREADS": "2"},
        "a+ADVGUARD_MAX_BATCH_SIZE=64": {
            "ADVGUARD_BUNDLE": "b",
            "ADVGUARD_SEARCH_THREADS": "1",
            "ADVGUARD_MAX_BATCH_SIZE": "64",
        },
    }
    for bad in ("SEARCH_THREADS=2", "ADVGUARD_SEARCH_THREADS", "ADVGUARD_=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="ADVGUARD_NAME=VALUE"):
            also_setting(bad)
    run = interleaved_ratios(
        {
            "a": _interleaved_service(300.0, 6.0),
            "a+ADVGUARD_MAX_BATCH_SIZE=64": _interleaved_service(270.0, 6.6),
            "b": _interleaved_service(400.0, 5.1),
        }
    )
    variant = {
        "torch_threads": 2,
        "interleaved": run,
        "a_over_b": 0.75,
        "a_unscreened_over_b": 0.8,
        "a_prime_over_b": None,
    }
    args = argparse.Namespace(rounds=2, slice=5.0, concurrency=[32], clients=0)
    table = interleaved_table([variant], args).splitlines()
    assert table[-2].startswith("| (a) guard on, ADVGUARD_MAX_BATCH_SIZE=64 | 2 | 270.0 | 67.5%")
    line = issue_target_line([variant], "paper")
    assert "(a, ADVGUARD_MAX_BATCH_SIZE=64) 67.5% of the throughput" in line


async def _slices_sent(requests: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Two load slices of one service, the second going on from the first's ``next_request``,
    against a server that answers every POST (and an empty /metrics) and records each body."""
    bodies: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length)
                if head.startswith("POST"):
                    bodies.append(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        first = await load_level("127.0.0.1", port, port, requests, 1, 0.05)
        second = await load_level("127.0.0.1", port, port, requests, 1, 0.05, first["next_request"])
    return bodies, [first["next_request"], second["next_request"]]


def test_load_slices_go_through_every_upload_before_sending_one_again() -> None:
    """A run's slices continue where the last one stopped: every image is sent once before any
    is sent again (a slice that started over would resend the first images, which the query
    screening answers on its more costly near-duplicate path)."""
    requests = [multipart_request("/classify", f"image {i}".encode()) for i in range(7)]
    uploads = [raw.split(b"\r\n\r\n", 1)[1] for raw in requests]
    bodies, following = asyncio.run(_slices_sent(requests))
    assert following[1] == len(bodies) > following[0] > 0
    assert bodies == [uploads[i % len(uploads)] for i in range(len(bodies))]
    assert len(bodies) > len(uploads)  # the check saw the wrap-around, not only a prefix
