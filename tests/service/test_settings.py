"""Settings from the environment: a misspelt name is caught, not silently ignored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.service.settings import ENV_PREFIX, Settings, misspelt_settings

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
