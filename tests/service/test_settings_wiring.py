"""Settings reach what they configure: each setting below is given a value other than its default
(values pairwise distinct, so that two settings swapped on the way show), and the component the
service builds from them (guard, flag policy, tracker, stateful detector and its store, the
lingering close, the identity headers, the admin listener) is found to carry it. The ones that
matter most are checked by what the service then does: the threshold it serves for a retention,
the query that the stateful rule's match counts first refuse, the header a caller is known by."""

from __future__ import annotations

import argparse
import io
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.bundle import load_honest_classes, load_honest_scores
from app.core.errors import BundleError
from app.core.flagging import HonestTraffic, calibrate_policy
from app.service import cli
from app.service.linger import LingeringClose
from app.service.main import create_app, flag_policy_for
from app.service.settings import DEFAULT_BUNDLE, Settings
from app.service.state import Service
from tests.service.helpers import LabelledImage, RedisProcess, admin_of, upload

T = TypeVar("T")

MANIFEST = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())["calibration"]
RETENTION = "0.90"  # a calibrated operating point of the demo bundle, not its default one
ADMIN_TOKEN = "s3cret"
CLIENT_HEADER = "X-Caller-Name"
ADMIN_HEADER = "X-Ops-Token"
KEY_HEADER = "X-Caller-Key"
SECRET = "test-secret"

# Given to both trackers' services (the Redis one adds REDIS_ONLY). Numbers pairwise distinct.
WIRED: dict[str, Any] = {
    "retention": float(RETENTION),
    "flag_false_rate": 0.02,
    "flag_horizon": 150,
    "stateful_ttl_s": 1234.0,
    "stateful_client_ttl_s": 4321.0,
    "stateful_max_fingerprints": 777,
    "stateful_per_client": 33,
    "stateful_max_clients": 555,
    "stateful_client_matches": 3,
    "stateful_global_matches": 7,
    "stateful_changed_matches": 4,
    "stateful_consistent_matches": 2,
    "stateful_changed_rejected": True,
    "stateful_blend_clients": 888,
    "stateful_close_radius": 6,
    "tracker_max_clients": 999,
    "linger_max_bytes": 4096,
    "linger_max_s": 12.5,
    "linger_idle_s": 2.5,
    "linger_max_connections": 9,
    "client_id_header": CLIENT_HEADER,
    "admin_token_header": ADMIN_HEADER,
}
REDIS_ONLY: dict[str, Any] = {"redis_timeout_s": 0.75, "tracker_buffer_size": 321}

Getter = Callable[[TestClient], Any]


def service_of(client: TestClient) -> Service:
    app: Any = client.app
    service = app.state.service
    assert isinstance(service, Service)
    return service


def middleware(client: TestClient, kind: type[T]) -> T:
    """The instance of middleware ``kind`` in the started app's stack."""
    app: Any = client.app
    layer = app.middleware_stack
    while layer is not None:
        if isinstance(layer, kind):
            return layer
        layer = getattr(layer, "app", None)
    raise AssertionError(f"no {kind.__name__} in the middleware stack")


def store(client: TestClient) -> Any:
    detector = service_of(client).stateful
    assert detector is not None
    return detector.store


def blends(client: TestClient) -> Any:
    detector = service_of(client).stateful
    assert detector is not None
    return detector.blends


def rule(client: TestClient) -> Any:
    detector = service_of(client).stateful
    assert detector is not None
    return detector.rule


def tracker(client: TestClient) -> Any:
    return service_of(client).tracker


def socket_timeouts(redis_client: Any) -> tuple[float, float]:
    kwargs = redis_client.connection_pool.connection_kwargs
    return kwargs["socket_timeout"], kwargs["socket_connect_timeout"]


def explained(client: TestClient, data: bytes, headers: dict[str, str]) -> Any:
    """``POST /classify?explain=true``: the explanation comes back to trusted callers only."""
    files = {"file": ("image", data, "application/octet-stream")}
    response = client.post("/classify", params={"explain": "true"}, files=files, headers=headers)
    assert response.status_code == 200
    return response.json()


# (setting, what carries it); the value carried must be the setting's value
BOTH: dict[str, Getter] = {
    "stateful_ttl_s": lambda c: store(c).ttl_s,
    "stateful_client_ttl_s": lambda c: store(c).client_ttl_s,
    "stateful_max_fingerprints": lambda c: store(c).max_fingerprints,
    "stateful_per_client": lambda c: store(c).per_client,
    "stateful_client_matches": lambda c: rule(c).client_matches,
    "stateful_global_matches": lambda c: rule(c).global_matches,
    "stateful_changed_matches": lambda c: rule(c).changed_matches,
    "stateful_consistent_matches": lambda c: rule(c).consistent_matches,
    "stateful_changed_rejected": lambda c: rule(c).changed_includes_rejected,
    "stateful_ttl_s/blend_memory": lambda c: blends(c).ttl_s,
    "stateful_close_radius": lambda c: store(c).scheme.close_radius,
    "linger_max_bytes": lambda c: middleware(c, LingeringClose).max_bytes,
    "linger_max_s": lambda c: middleware(c, LingeringClose).max_s,
    "linger_idle_s": lambda c: middleware(c, LingeringClose).idle_s,
    "linger_max_connections": lambda c: middleware(c, LingeringClose).max_active,
}
IN_PROCESS_ONLY: dict[str, Getter] = {
    "stateful_max_clients": lambda c: store(c).max_clients,
    "stateful_blend_clients": lambda c: blends(c).max_clients,
    "tracker_max_clients": lambda c: tracker(c).max_clients,
}
REDIS_GETTERS: dict[str, Getter] = {
    "tracker_buffer_size": lambda c: tracker(c)._buffer.maxlen,  # the replay buffer's bound
    "redis_timeout_s": lambda c: socket_timeouts(tracker(c)._redis),
    "redis_timeout_s/fingerprint_store": lambda c: socket_timeouts(store(c).redis),
    "redis_timeout_s/blend_memory": lambda c: socket_timeouts(blends(c).redis),
}
CASES = [
    *[("memory", name) for name in [*BOTH, *IN_PROCESS_ONLY]],
    *[("redis", name) for name in [*BOTH, *REDIS_GETTERS]],
]


@contextmanager
def started(**overrides: Any) -> Iterator[TestClient]:
    """A TestClient of the service with these settings, its lifespan started (model on the CPU)."""
    app = create_app(Settings(**{"device": "cpu", "max_wait_ms": 1.0, **overrides}))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def memory_client() -> Iterator[TestClient]:
    with started(**WIRED, admin_token=ADMIN_TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisProcess) -> Iterator[TestClient]:
    with started(
        **WIRED,
        **REDIS_ONLY,
        redis_url=redis_server.url,
        stateful_secret=SECRET,
        redis_prefix=f"wiring-{uuid.uuid4().hex[:12]}",
    ) as client:
        yield client


def test_the_wired_values_are_none_of_the_defaults_and_pairwise_distinct() -> None:
    """Else a dropped setting (its default served) or two swapped would go unseen below."""
    values = {**WIRED, **REDIS_ONLY}
    for name, value in values.items():
        assert value != Settings.model_fields[name].default, name
    numbers = [v for v in values.values() if isinstance(v, int | float) and not isinstance(v, bool)]
    assert len(set(numbers)) == len(numbers)
    assert float(RETENTION) != MANIFEST["operating_retention"]


@pytest.mark.parametrize(("backend", "setting"), CASES)
def test_the_component_carries_the_setting(
    backend: str, setting: str, request: pytest.FixtureRequest
) -> None:
    client: TestClient = request.getfixturevalue(f"{backend}_client")
    name = setting.split("/")[0]
    wanted = {**WIRED, **REDIS_ONLY}[name]
    getter = {**BOTH, **IN_PROCESS_ONLY, **REDIS_GETTERS}[setting]
    if name == "redis_timeout_s":
        wanted = (wanted, wanted)
    assert getter(client) == wanted


# --------------------------------------------------------------------------- retention


def test_retention_serves_the_bundles_threshold_for_it(
    monkeypatch: pytest.MonkeyPatch, test_images: list[LabelledImage]
) -> None:
    """ADVGUARD_RETENTION, read from the environment: the guard's threshold, what a trusted caller
    is shown (the explanation's threshold, and the exposed one), and every decision are the
    manifest's calibrated threshold for that retention."""
    expected = MANIFEST["thresholds"][RETENTION]
    assert expected != pytest.approx(MANIFEST["threshold"])
    monkeypatch.setenv("ADVGUARD_RETENTION", RETENTION)
    monkeypatch.setenv("ADVGUARD_DEVICE", "cpu")
    monkeypatch.setenv("ADVGUARD_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("ADVGUARD_EXPOSE_SCORES", "true")
    app = create_app()
    with TestClient(app) as client:
        assert service_of(client).guard.threshold == pytest.approx(expected)
        summary = client.get("/v1/bundle").json()
        assert summary["threshold"] == pytest.approx(expected)
        assert summary["operating_retention"] == pytest.approx(float(RETENTION))
        for image in test_images[:6]:
            body = explained(client, image.data, {"X-Admin-Token": ADMIN_TOKEN})
            assert body["threshold"] == pytest.approx(expected)
            assert body["explanation"]["threshold"] == pytest.approx(expected)
            assert (body["score"] >= expected) == (body["decision"] == "accepted")


@pytest.mark.parametrize("retention", [0.97, 0.5])
def test_an_uncalibrated_retention_refuses_to_start(retention: float) -> None:
    calibrated = sorted(MANIFEST["thresholds"])
    assert f"{retention:.2f}" not in calibrated
    app = create_app(Settings(device="cpu", retention=retention))
    message = f"no calibrated threshold for retention {retention:.2f}; have {calibrated}"
    with pytest.raises(BundleError) as refused, TestClient(app):
        pass
    assert str(refused.value) == message
    assert not hasattr(app.state, "service")


# --------------------------------------------------------------------------- flag calibration


def test_flag_false_rate_and_horizon_calibrate_the_flag_threshold(
    memory_client: TestClient,
) -> None:
    """The flag threshold is the one calibrated at the set false-flag rate and horizon (on the
    served threshold, on per-class values: the demo bundle has its scores' classes), not at
    either default."""
    service = service_of(memory_client)
    settings = service.settings
    scores = load_honest_scores(DEFAULT_BUNDLE, service.guard.manifest)
    classes = load_honest_classes(DEFAULT_BUNDLE, service.guard.manifest)
    assert classes is not None and service.flag_policy.scale is not None
    honest = HonestTraffic(scores, service.guard.threshold, classes)

    def calibrated(rate: float, horizon: int) -> float:
        return calibrate_policy(
            settings.flag_policy,
            honest,
            min_requests=settings.flag_min_requests,
            ewma_alpha=settings.ewma_alpha,
            false_flag_rate=rate,
            horizon=horizon,
        ).threshold

    rate, horizon = WIRED["flag_false_rate"], WIRED["flag_horizon"]
    assert horizon > settings.flag_min_requests  # else the service calibrates at min_requests
    wanted = calibrated(rate, horizon)
    assert service.flag_policy.threshold == pytest.approx(wanted)
    fields = Settings.model_fields
    assert wanted != pytest.approx(calibrated(fields["flag_false_rate"].default, horizon))
    assert wanted != pytest.approx(calibrated(rate, fields["flag_horizon"].default))


def test_flag_per_class_off_calibrates_on_the_raw_scores(memory_client: TestClient) -> None:
    """``flag_per_class=false``: no class scale, the threshold of the raw honest scores, and each
    request adds its score itself to its client's window."""
    service = service_of(memory_client)
    settings = service.settings.model_copy(update={"flag_per_class": False})
    raw = flag_policy_for(settings, service.guard)
    assert raw.scale is None
    scores = load_honest_scores(DEFAULT_BUNDLE, service.guard.manifest)
    expected = calibrate_policy(
        settings.flag_policy,
        HonestTraffic(scores, service.guard.threshold),
        min_requests=settings.flag_min_requests,
        ewma_alpha=settings.ewma_alpha,
        false_flag_rate=settings.flag_false_rate,
        horizon=settings.flag_horizon,
    )
    assert raw.threshold == pytest.approx(expected.threshold)
    assert raw.threshold != pytest.approx(service.flag_policy.threshold)
    assert raw.flag_value(0.123, 3) == 0.123
    assert service.flag_policy.flag_value(0.123, 3) != 0.123


# --------------------------------------------------------------------------- stateful rule


def near_duplicates(data: bytes, n: int) -> list[bytes]:
    """``n`` PNGs of the image, each with the lowest bit of one value flipped (a value of its
    own): distinct queries, and near-duplicates of each other for the stateful detector."""
    base = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = []
    for i in range(n):
        image = base.copy()
        image[i, i, i % 3] ^= 1
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@contextmanager
def rule_client() -> Iterator[TestClient]:
    """A fresh service (empty fingerprint store) whose rule is the wired match counts alone."""
    with started(
        stateful_client_matches=WIRED["stateful_client_matches"],
        stateful_global_matches=WIRED["stateful_global_matches"],
        stateful_changed_matches=0,  # off: only the counts decide
        stateful_policy="refuse",
        stateful_secret=SECRET,  # the same window hashes every run
    ) as client:
        rule_of = rule(client)
        assert (rule_of.client_matches, rule_of.global_matches) == (3, 7)
        yield client


def test_client_matches_refuse_the_query_with_that_many_of_its_clients_own(
    test_images: list[LabelledImage],
) -> None:
    """One client: its fourth near-duplicate (three before it) is the first refused; at the
    default of 5 it would be the sixth. Global matches (7) are not reached before."""
    queries = near_duplicates(test_images[3].data, 6)
    with rule_client() as client:
        responses = [upload(client, q, {"X-Client-ID": "mallory"}) for q in queries]
    assert [r.status_code for r in responses] == [200, 200, 200, 403, 403, 403]
    assert responses[3].json()["error"] == "query_refused"


def test_global_matches_refuse_the_query_with_that_many_of_everyones(
    test_images: list[LabelledImage],
) -> None:
    """A client each (a Sybil spread): the eighth near-duplicate (seven before it) is the first
    refused; at the default of 5 the sixth would be, with the counts swapped the fourth."""
    queries = near_duplicates(test_images[4].data, 9)
    with rule_client() as client:
        responses = [
            upload(client, q, {"X-Client-ID": f"sybil-{i}"}) for i, q in enumerate(queries)
        ]
    assert [r.status_code for r in responses] == [200] * 7 + [403, 403]


# --------------------------------------------------------------------------- header names


def test_renamed_client_id_and_admin_token_headers_identify(
    memory_client: TestClient, test_images: list[LabelledImage]
) -> None:
    service = service_of(memory_client)
    plain = upload(memory_client, test_images[0].data, {CLIENT_HEADER: "carol"})
    assert plain.status_code == 200
    # the default header names nobody now: the caller is its peer address
    assert upload(memory_client, test_images[1].data, {"X-Client-ID": "dave"}).status_code == 200
    assert service.tracker.get("carol") is not None
    assert service.tracker.get("dave") is None
    assert service.tracker.get("testclient") is not None  # TestClient's peer
    # the admin token is read from the renamed header only
    admin = admin_of(memory_client)
    carol = admin.get("/clients/carol", headers={ADMIN_HEADER: ADMIN_TOKEN})
    assert carol.status_code == 200 and carol.json()["requests"] == 1
    assert admin.get("/clients/carol", headers={"X-Admin-Token": ADMIN_TOKEN}).status_code == 401
    # and it makes a trusted caller (shown the explanation) from the renamed header only
    trusted = explained(memory_client, test_images[2].data, {ADMIN_HEADER: ADMIN_TOKEN})
    assert trusted["explanation"]["threshold"] == pytest.approx(MANIFEST["thresholds"][RETENTION])
    untrusted = explained(memory_client, test_images[5].data, {"X-Admin-Token": ADMIN_TOKEN})
    assert untrusted["explanation"] is None


def test_renamed_api_key_header_identifies(test_images: list[LabelledImage]) -> None:
    """Both checks of the key read the renamed header: the one before the body is read (the
    middleware) and the one that names the client (the route)."""
    with started(api_keys={"alice": "key-a"}, api_key_header=KEY_HEADER) as client:
        assert upload(client, test_images[0].data, {KEY_HEADER: "key-a"}).status_code == 200
        refused = upload(client, test_images[1].data, {"X-API-Key": "key-a"})
        assert refused.status_code == 401
        stats = service_of(client).tracker.get("alice")
    assert stats is not None and stats.requests == 1


# --------------------------------------------------------------------------- admin host


def test_admin_host_binds_the_admin_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    """ADVGUARD_ADMIN_HOST (or --admin-host, which wins) is the admin listener's address, the
    public one keeping --host; unset, the admin listener takes --host too."""
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    monkeypatch.setenv("ADVGUARD_DEVICE", "cpu")

    def hosts(*argv: str) -> tuple[str, str]:
        args = parser.parse_args(["serve", "--host", "127.0.0.2", "--port", "8123", *argv])
        settings, app = cli._configured_app(args)
        public, admin = cli._listeners(args, settings, app)
        assert (public.config.port, admin.config.port) == (8123, settings.admin_port)
        return public.config.host, admin.config.host

    assert hosts() == ("127.0.0.2", "127.0.0.2")
    monkeypatch.setenv("ADVGUARD_ADMIN_HOST", "10.9.8.7")
    assert hosts() == ("127.0.0.2", "10.9.8.7")
    assert hosts("--admin-host", "10.1.1.1") == ("127.0.0.2", "10.1.1.1")
