"""deploy/verify-image.sh and the podman stack, without podman: shellcheck, the scripts' argument
handling, the Redis entrypoint, hadolint on the Containerfiles and docker-compose on the podman
override. The image build and run itself is a step of .ci/run after pytest (minutes, several GB:
docs/deploy.md, "Verifying the image"); check-stack.sh is run by hand before a release."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, REPO
from tests.deploy.test_compose import compose_config

VERIFY = DEPLOY / "verify-image.sh"
STACK = DEPLOY / "podman" / "check-stack.sh"
REDIS_ENTRYPOINT = DEPLOY / "podman" / "redis-entrypoint.sh"
OVERRIDE = "deploy/podman/docker-compose.podman.yml"


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_shellcheck_passes(tool: Callable[[str], str]) -> None:
    done = subprocess.run(
        [tool("shellcheck"), str(VERIFY), str(STACK), str(REDIS_ENTRYPOINT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_is_real(tool: Callable[[str], str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    done = subprocess.run(
        [tool("shellcheck"), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "SC2086" in done.stdout


@pytest.mark.parametrize("script", [VERIFY, STACK], ids=["verify-image", "check-stack"])
def test_help_exits_zero_and_lists_the_options(script: Path) -> None:
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: deploy/")
    assert "--timeout" in done.stdout or "--ready-timeout" in done.stdout


@pytest.mark.parametrize("script", [VERIFY, STACK], ids=["verify-image", "check-stack"])
def test_an_unknown_option_fails_with_a_message(script: Path) -> None:
    done = run(script, "--no-such-option")
    assert done.returncode != 0
    assert "unknown" in done.stderr and "--help" in done.stderr


def test_verify_image_names_the_metrics_port_and_defaults_to_the_admin_port() -> None:
    assert "--metrics-port PORT" in run(VERIFY, "--help").stdout
    assert "default 9000" in run(VERIFY, "--help").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics-port", "nine"], "not a whole number"),
        (["--metrics-port"], "needs a value"),
        (["/nonexistent/cat.jpg"], "no such image or archive"),
    ],
)
def test_verify_image_refuses_bad_arguments_before_building(args: list[str], message: str) -> None:
    done = run(VERIFY, *args)
    assert done.returncode != 0 and message in done.stderr


def test_redis_entrypoint_turns_protected_mode_off_for_redis_server_only(tmp_path: Path) -> None:
    """The compose file's `redis-server --appendonly yes ...` gains `--protected-mode no` (as in
    the official image); any other command runs as given."""
    fake = tmp_path / "redis-server"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}

    def entry(*args: str) -> str:
        done = subprocess.run(
            ["sh", str(REDIS_ENTRYPOINT), *args], capture_output=True, text=True, env=env,
            timeout=10, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    assert entry("redis-server", "--appendonly", "yes") == "--protected-mode no --appendonly yes"
    assert entry("echo", "redis-cli", "ping") == "redis-cli ping"


def test_containerfiles_pass_hadolint(tool: Callable[[str], str]) -> None:
    files = sorted(str(path) for path in (DEPLOY / "podman").glob("Containerfile.*"))
    assert len(files) == 2
    done = subprocess.run(
        [tool("hadolint"), "--no-color", *files], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_podman_override_builds_redis_and_prometheus_locally(tool: Callable[[str], str]) -> None:
    config = compose_config(tool, "docker-compose.yml", "docker-compose.cpu.yml", OVERRIDE)
    services = config["services"]
    for name in ("redis", "prometheus"):
        image = services[name]["image"]
        assert image.startswith("localhost/advguard-"), image  # never an official image's name
        assert Path(services[name]["build"]["context"]) == DEPLOY / "podman"
        assert (DEPLOY / "podman" / services[name]["build"]["dockerfile"]).is_file()
    # the compose file's command lines are unchanged
    base = compose_config(tool, "docker-compose.yml")["services"]
    for name in ("redis", "prometheus"):
        assert services[name]["command"] == base[name]["command"]
    assert services["grafana"]["profiles"] == ["grafana"]  # no Grafana package: left out
    assert services["api-cpu"]["build"]["args"]["CUDA_IMAGE"] == "localhost/advguard-base:debian12"
