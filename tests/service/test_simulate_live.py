"""``advguard simulate`` end to end: simulated clients over HTTP, then the tracker store holds
exactly what the replay of the served scores predicts (counts, windows, flagged set)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.core.guard import Guard
from app.core.images import decode_image
from app.service.main import flag_policy_for
from app.service.settings import DEFAULT_BUNDLE, Settings
from evaluation.data import eight_bit
from evaluation.simulate import (
    HONEST,
    live_agreement,
    plan_population,
    pool_flag_values,
    run_live,
    score_pool,
)
from tests.service.helpers import LabelledImage, admin_of, fgsm

ADMIN = "s3cret"


def _uint8(guard: Guard, files: list[bytes]) -> np.ndarray:
    return eight_bit(np.stack([guard.pixels(decode_image(data)).numpy() for data in files]))


def test_simulated_run_leaves_the_predicted_state(
    make_client: Any,
    tracker_kind: str,
    guard: Guard,
    test_images: list[LabelledImage],
    request: Any,
) -> None:
    honest = _uint8(guard, [image.data for image in test_images[:60]])
    adversarial = _uint8(guard, fgsm(guard, test_images[60:100]))
    pools = {HONEST: score_pool(guard, honest), "fgsm": score_pool(guard, adversarial)}
    plans = plan_population(
        {HONEST: len(honest), "fgsm": len(adversarial)}, ["fgsm"], 3, 1, 25, 5, seed=3
    )
    # the service's policy reads per-class p-values (the demo bundle has its scores' classes)
    per_class = flag_policy_for(Settings(bundle=DEFAULT_BUNDLE, flag_policy="mean"), guard)
    assert per_class.scale is not None
    honest_mean, fgsm_mean = (
        pool_flag_values(pools[k], per_class).mean() for k in (HONEST, "fgsm")
    )
    settings = {
        "admin_token": ADMIN,
        "expose_scores": True,
        # a mean policy that FGSM clients cross within 25 requests and honest ones do not
        "flag_policy": "mean",
        "flag_threshold": float((honest_mean + fgsm_mean) / 2),
        "flag_min_requests": 5,
    }
    with make_client(**settings) as client:
        clients = run_live(client, admin_of(client), plans, pools, ADMIN, concurrency=1)
        policy = client.app_state.service.flag_policy
        prefix = client.app_state.settings.redis_prefix
    agreement = live_agreement(clients, policy, pools)
    assert agreement["all_answered_200"] and agreement["counts_match"]
    assert agreement["flags_match"] and agreement["max_score_gap"] < 1e-4
    by_id = {row["client_id"]: row for row in agreement["clients"]}
    assert by_id["sim-fgsm-0"]["replay_flagged_at"] is not None  # the pure attacker is caught
    for row in agreement["clients"]:
        assert row["service_flagged_near_request"] == row["replay_flagged_at"]
    if tracker_kind == "redis":
        store = request.getfixturevalue("redis_server").client()
        flagged = {r["client_id"] for r in agreement["clients"] if r["replay_flagged_at"]}
        assert set(store.zrange(f"{prefix}:flagged", 0, -1)) == flagged
        for live in clients:
            stored = store.hgetall(f"{prefix}:client:{{{live.plan.client_id}}}")
            assert int(stored["requests"]) == len(live.plan.requests)
            assert int(stored["scored"]) == len(live.plan.requests)
            # per request, its served score ranked among its predicted class's honest scores (the
            # pool's prediction: a rejected answer withholds it)
            values = [
                policy.flag_value(float(r.score), int(pools[pool].predictions[row]))
                for r, (pool, row) in zip(live.requests, live.plan.requests, strict=True)
                if r.score is not None
            ]
            assert len(values) == len(live.requests)
            assert float(stored["mean"]) == pytest.approx(np.mean(values), abs=1e-9)
            assert int(stored["wrej"]) == sum(not r.accepted for r in live.requests)
