"""A real Prometheus (Debian package) scrapes a real ``advguard serve``: after a short burst of
honest and FGSM traffic, every PromQL expression of every dashboard panel and alert rule returns
data through Prometheus' HTTP API.

Prometheus runs the shipped ``deploy/prometheus/prometheus.yml`` (job names, metrics path) with
the targets pointed at loopback ports and 1 s scrape and evaluation intervals, and loads the
shipped ``alerts.yml``. The service tracks clients in a real redis-server.

An alerting rule's expression is empty while the alert is not firing (that is what ``expr > x``
means), so for an alert that does not fire in a 1-minute test (API down, p99 above 500 ms for
10 minutes, ...) each side of its comparison must return data instead: the quantity it watches is
there, under the labels the rule expects. AdvguardClientsFlagged does fire (an FGSM client gets
flagged), and with it the dashboards' ``ALERTS`` annotation.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.deploy.helpers import DEPLOY, advguard_serve, find_tool, promql_expressions, wait_http_ok
from tests.service import conftest as service_fixtures
from tests.service.helpers import LabelledImage, RedisProcess, fgsm, free_port

# the service tests' session fixtures: the demo bundle's Guard, CIFAR-10 test JPEGs from the tar
guard = service_fixtures.guard
test_images = service_fixtures.test_images

ADMIN_TOKEN = "live-test-token"
MAX_UPLOAD = 100_000
ATTACKER, HONEST, CLUMSY = "attacker", "honest", "clumsy"
HONEST_REQUESTS = 40
DATA_TIMEOUT_S = 45.0  # how long the expressions get to return data after the traffic


def prometheus_config(api_port: int, prometheus_port: int) -> dict[str, Any]:
    """The shipped prometheus.yml, its targets on loopback, scraping and evaluating every second."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    targets = {"advguard-api": api_port, "prometheus": prometheus_port}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "1s"
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{targets[job['job_name']]}"]
    return config


@contextmanager
def prometheus(workdir: Path, api_port: int) -> Iterator[str]:
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(api_port, port)))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                find_tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http_ok(f"{base}/-/ready", process, log, 60)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def split_comparison(expr: str) -> tuple[str, str] | None:
    """The two sides of ``expr``'s top-level comparison (outside any bracket or string)."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            for op in COMPARISONS:
                if expr.startswith(op, i):
                    right = expr[i + len(op) :].strip()
                    right = right.removeprefix("bool ").strip()
                    return expr[:i].strip(), right
        i += 1
    return None


def query(client: httpx.Client, expr: str) -> list[Any]:
    """The result of an instant query; a scalar counts as one sample."""
    response = client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [data["result"]]
    result: list[Any] = data["result"]
    return result


def missing_data(
    client: httpx.Client, expressions: list[tuple[str, str]]
) -> tuple[list[str], list[str]]:
    """Where an expression returns nothing (for an alert: a side of its comparison), and the
    alerts checked by the sides of their comparison (not firing)."""
    missing, by_sides = [], []
    for where, expr in expressions:
        if query(client, expr):
            continue
        sides = split_comparison(expr) if where.startswith("alerts.yml") else None
        if sides is None:
            missing.append(f"{where}: {expr}")
            continue
        by_sides.append(where.removeprefix("alerts.yml: "))
        missing.extend(
            f"{where} (side of its comparison): {side}" for side in sides if not query(client, side)
        )
    return missing, by_sides


def post(client: httpx.Client, client_id: str, name: str, data: bytes) -> httpx.Response:
    return client.post(
        "/classify", files={"file": (name, data)}, headers={"X-Client-ID": client_id}
    )


def send_traffic(
    base: str, admin_base: str, honest: list[LabelledImage], adversarial: list[bytes]
) -> dict[str, Any]:
    """An honest client and an FGSM client in parallel (the attacker until it is flagged), then
    a client sending a non-image (400, decision ``error``) and an oversized file (413)."""
    report: dict[str, Any] = {"statuses": []}
    errors: list[BaseException] = []

    def honest_client() -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            for image in honest:
                report["statuses"].append(post(client, HONEST, image.name, image.data).status_code)

    def attacker() -> None:
        admin = {"X-Admin-Token": ADMIN_TOKEN}
        with (
            httpx.Client(base_url=base, timeout=30) as client,
            httpx.Client(base_url=admin_base, timeout=30) as operator,
        ):
            for i, data in enumerate(adversarial, start=1):
                report["statuses"].append(post(client, ATTACKER, f"adv{i}.png", data).status_code)
                if operator.get(f"/clients/{ATTACKER}", headers=admin).json()["flagged"]:
                    report["flagged_at"] = i
                    return

    def guarded(target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # re-raised in the test thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(f)) for f in (honest_client, attacker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    with httpx.Client(base_url=base, timeout=30) as client:
        report["invalid"] = post(client, CLUMSY, "x.png", b"not an image at all").status_code
        report["too_large"] = post(client, CLUMSY, "big.png", b"\0" * (4 * MAX_UPLOAD)).status_code
    return report


def test_every_dashboard_and_alert_expression_returns_data(
    tmp_path: Path,
    guard: Any,
    test_images: list[LabelledImage],
) -> None:
    started = time.monotonic()
    expressions = promql_expressions()
    assert len(expressions) > 20
    redis_server = RedisProcess(free_port(), tmp_path)
    redis_server.start()
    api_port, admin_port = free_port(), free_port()
    env = {
        "ADVGUARD_REDIS_URL": redis_server.url,
        "ADVGUARD_STATEFUL_SECRET": "live-test-secret",
        "ADVGUARD_REDIS_PREFIX": f"live-{uuid.uuid4().hex[:8]}",
        "ADVGUARD_ADMIN_TOKEN": ADMIN_TOKEN,
        "ADVGUARD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }
    try:
        with (
            # Prometheus scrapes the admin listener, as deploy/prometheus/prometheus.yml does
            prometheus(tmp_path, admin_port) as prom,
            advguard_serve(api_port, tmp_path / "serve.log", env, admin_port=admin_port) as _,
        ):
            assert httpx.get(f"http://127.0.0.1:{api_port}/metrics").status_code == 404
            # the honest client sends authentic test images; the attacker FGSM (8/255) ones
            # made from other test images, as in tests/service/test_fgsm_flagging.py
            honest = test_images[:HONEST_REQUESTS]
            adversarial = fgsm(guard, test_images[50:100])
            # the counters' zeros must be stored before the traffic moves them: a counter first
            # seen at 1 has no increase (scrapes time out after 1 s on a busy machine)
            with httpx.Client(base_url=prom, timeout=10) as client:
                deadline = time.monotonic() + 30
                while not query(client, 'advguard_clients_flagged_total{job="advguard-api"}'):
                    assert time.monotonic() < deadline, "Prometheus never scraped the service"
                    time.sleep(0.5)
            traffic = send_traffic(
                f"http://127.0.0.1:{api_port}",
                f"http://127.0.0.1:{admin_port}",
                honest,
                adversarial,
            )
            assert traffic["statuses"].count(200) == len(traffic["statuses"]), traffic
            assert "flagged_at" in traffic, "the FGSM client was never flagged"
            assert (traffic["invalid"], traffic["too_large"]) == (400, 413)
            with httpx.Client(base_url=prom, timeout=10) as client:
                deadline = time.monotonic() + DATA_TIMEOUT_S
                while True:
                    missing, by_sides = missing_data(client, expressions)
                    if not missing or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                firing = query(client, 'ALERTS{alertstate="firing"}')
                targets = client.get("/api/v1/targets").json()["data"]["activeTargets"]
                rules = client.get("/api/v1/rules").json()["data"]["groups"]
    finally:
        redis_server.kill()
    print(
        f"\n{len(expressions)} expressions; attacker flagged at request {traffic['flagged_at']}; "
        f"firing: {sorted(a['metric']['alertname'] for a in firing)}; "
        f"checked by the sides of their comparison: {by_sides}; "
        f"{time.monotonic() - started:.1f}s"
    )
    assert all(t["health"] == "up" for t in targets), targets
    unhealthy = [
        (r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] != "ok"
    ]
    assert unhealthy == [], unhealthy
    assert missing == [], "expressions without data:\n" + "\n".join(missing)
    assert "AdvguardClientsFlagged" in {a["metric"]["alertname"] for a in firing}
