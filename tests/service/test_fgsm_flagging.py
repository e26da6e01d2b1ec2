"""Section 5.1 of the paper, end to end: a source of FGSM adversarials is flagged, an honest
source sending authentic test images is not, and the tracker store holds both."""

from __future__ import annotations

from typing import Any

from app.core.flagging import ScoreWindow
from app.core.guard import Guard
from tests.service.helpers import LabelledImage, admin_of, fgsm, upload

ADMIN = {"X-Admin-Token": "s3cret"}
REQUESTS = 50


def _window(stats: dict[str, Any]) -> ScoreWindow:
    return ScoreWindow(
        stats["scored"],
        stats["mean_score"],
        stats["ewma_score"],
        stats["window_rejected"],
        stats["cusum"],
    )


def test_fgsm_client_flagged_honest_client_not(
    make_client: Any,
    tracker_kind: str,
    guard: Guard,
    test_images: list[LabelledImage],
    request: Any,
) -> None:
    authentic = test_images[:REQUESTS]  # 5 per class, interleaved
    # adversarials made from other test images (the next 5 per class), one FGSM step, eps 8/255
    adversarial = fgsm(guard, test_images[REQUESTS : 2 * REQUESTS])
    flagged_at = None
    with make_client(admin_token="s3cret") as client:
        for i, data in enumerate(adversarial, start=1):
            assert upload(client, data, {"X-Client-ID": "attacker"}).status_code == 200
            if (
                flagged_at is None
                and admin_of(client).get("/clients/attacker", headers=ADMIN).json()["flagged"]
            ):
                flagged_at = i
        for image in authentic:
            assert upload(client, image.data, {"X-Client-ID": "honest"}).status_code == 200
        attacker = admin_of(client).get("/clients/attacker", headers=ADMIN).json()
        honest = admin_of(client).get("/clients/honest", headers=ADMIN).json()
        flagged = admin_of(client).get("/clients?flagged=true", headers=ADMIN).json()["clients"]
        policy = client.app_state.service.flag_policy
        prefix = client.app_state.settings.redis_prefix
    print(
        f"\n[{tracker_kind}] attacker flagged at request {flagged_at}; attacker mean "
        f"{attacker['mean_score']:.3f}, honest mean {honest['mean_score']:.3f}, "
        f"{policy.kind} threshold {policy.threshold:.3f} after {policy.min_requests}"
    )
    assert flagged_at is not None and flagged_at <= REQUESTS
    assert attacker["flagged"] and not honest["flagged"]
    assert [c["client_id"] for c in flagged] == ["attacker"]
    assert honest["requests"] == attacker["requests"] == REQUESTS
    assert policy.should_flag(_window(attacker)) and not policy.should_flag(_window(honest))
    if tracker_kind == "redis":
        store = request.getfixturevalue("redis_server").client()
        for client_id, stats in (("attacker", attacker), ("honest", honest)):
            stored = store.hgetall(f"{prefix}:client:{{{client_id}}}")
            assert int(stored["requests"]) == REQUESTS
            assert int(stored["accepted"]) == stats["accepted"]
            assert float(stored["mean"]) == stats["mean_score"]
            assert 0 < store.ttl(f"{prefix}:client:{{{client_id}}}") <= 7 * 24 * 3600
        assert store.zrange(f"{prefix}:flagged", 0, -1) == ["attacker"]
