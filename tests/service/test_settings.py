"""Settings from the environment: a misspelt name is caught, not silently ignored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.service.settings import ENV_PREFIX, Settings, misspelt_settings
from tests.service.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_misspellings_are_named_with_the_setting_they_most_likely_mean() -> None:
    environ = {
        "ADVGUARD_STATEFUL_POLCY": "silent",  # a letter dropped
        "ADVGUARD_REDIS_URLL": "redis://x",  # doubled
        "ADVGUARD_MAX_BATCHSIZE": "8",  # an underscore dropped
        "advguard_admin_tokne": "t",  # swapped, lower case (read case-insensitively)
        "REDIS_URL": "redis://x",  # not ours
        "ADVGUARD_STATEFUL_POLICY": "flag",  # a setting
    }
    assert misspelt_settings(environ) == [
        ("ADVGUARD_MAX_BATCHSIZE", "ADVGUARD_MAX_BATCH_SIZE"),
        ("ADVGUARD_REDIS_URLL", "ADVGUARD_REDIS_URL"),
        ("ADVGUARD_STATEFUL_POLCY", "ADVGUARD_STATEFUL_POLICY"),
        ("advguard_admin_tokne", "ADVGUARD_ADMIN_TOKEN"),
    ]


def test_no_setting_and_none_of_the_projects_other_variables_is_taken_for_a_misspelling() -> None:
    """Every setting's own name, in either case, and every other ADVGUARD_* variable that the
    deployment files, the CI script and the benchmarks use (ADVGUARD_PORT, the builder's
    ADVGUARD_BUILD_* arguments, ...): a new one too close to a setting's name fails here."""
    names = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
    assert misspelt_settings({name: "1" for name in names}) == []
    assert misspelt_settings({name.lower(): "1" for name in names}) == []
    files = [ROOT / "Dockerfile", *ROOT.glob("docker-compose*.yml"), ROOT / ".ci" / "run"]
    for folder in ("deploy", "bench", "tests"):
        files += [
            p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".yml", ".yaml")
        ]
    used = {
        match
        for path in files
        if path.is_file() and path != Path(__file__).resolve()
        for match in re.findall(r"ADVGUARD_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace"))
    }
    others = used - set(names) - {"ADVGUARD_STATEFUL_POLCY"}  # test_serve's misspelling
    assert {"ADVGUARD_PORT", "ADVGUARD_BUILD_ARCH", "ADVGUARD_SCREENSHOT"} <= others
    assert misspelt_settings({name: "1" for name in others}) == []


def test_the_shipped_secret_placeholders_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value deploy/k8s/secret.yaml ships is refused, naming its variable; real ones pass."""
    shipped = yaml.safe_load((ROOT / "deploy" / "k8s" / "secret.yaml").read_text())["stringData"]
    assert len(shipped) == 3
    for variable, value in shipped.items():
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            with pytest.raises(ValidationError, match=re.escape(variable)):
                Settings()
    Settings(admin_token="3f9c", api_keys={"a": "k1"}, stateful_secret="salt")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("localhost:6379", "must specify one of the following schemes"),
        ("http://cache:6379", "must specify one of the following schemes"),
        ("redis://:hunter2@cache:63x9", "Port could not be cast"),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_refused_at_start(
    url: str, why: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clients connect on first use: such a URL started a service whose every request was
    a 500 (its first use raised ValueError), instead of refusing to start. What ``advguard
    serve`` prints never repeats the URL, which may hold a password."""
    from app.cli import main

    with pytest.raises(ValidationError, match=why):
        Settings(redis_url=url, stateful_secret="salt")
    monkeypatch.setenv("ADVGUARD_REDIS_URL", url)
    monkeypatch.setenv("ADVGUARD_STATEFUL_SECRET", "salt")
    port, admin = str(free_port()), str(free_port())
    assert main(["serve", "--port", port, "--admin-port", admin, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start: redis_url:" in err and why in err
    assert "hunter2" not in err, err


@pytest.mark.parametrize(
    "url", ["redis://cache:6379/0", "rediss://:pw@cache:6380", "unix:///run/redis.sock", ""]
)
def test_every_url_redis_py_reads_is_taken(url: str) -> None:
    assert Settings(redis_url=url, stateful_secret="salt").redis_url == url


def test_a_cluster_is_not_reached_through_a_unix_socket() -> None:
    with pytest.raises(ValidationError, match="ADVGUARD_REDIS_CLUSTER needs"):
        Settings(redis_url="unix:///run/redis.sock", redis_cluster=True, stateful_secret="salt")
    Settings(redis_url="redis://node-1:7000", redis_cluster=True, stateful_secret="salt")
