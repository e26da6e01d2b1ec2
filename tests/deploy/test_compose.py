"""docker-compose.yml and its CPU override, validated and normalised by Debian's docker-compose
(1.29, no engine needed for `config`), then checked for what the demo relies on."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from index_builder.cli import add_build_arguments
from tests.deploy.helpers import REPO


def compose_config(tool: Callable[[str], str], *files: str, profiles: tuple[str, ...] = ()) -> Any:
    args = [tool("docker-compose")]
    for name in files:
        args += ["-f", name]
    for profile in profiles:
        args += ["--profile", profile]
    done = subprocess.run(
        [*args, "config"], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture
def base(tool: Callable[[str], str]) -> Any:
    return compose_config(tool, "docker-compose.yml")


@pytest.fixture
def cpu(tool: Callable[[str], str]) -> Any:
    return compose_config(tool, "docker-compose.yml", "docker-compose.cpu.yml")


def test_docker_compose_accepts_both_files(base: Any, cpu: Any) -> None:
    assert set(base["services"]) == {"api", "redis", "prometheus", "grafana", "traffic", "builder"}
    assert set(cpu["services"]) == set(base["services"]) | {"api-cpu", "builder-cpu"}


def test_docker_compose_rejects_a_broken_file(tool: Callable[[str], str], tmp_path: Path) -> None:
    """The validation above is real: an unknown key fails `docker-compose config`."""
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  api:\n    image: x\n    gpus_please: 1\n")
    done = subprocess.run(
        [tool("docker-compose"), "-f", str(broken), "config"], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0


def _volumes(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mounts by target; docker-compose 1.29 prints the short form ``source:target[:ro]``."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith(("/", ".")) else "volume"
            volume = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        mounts[volume["target"]] = volume
    return mounts


def test_api_reserves_a_gpu_and_reads_the_bundle_volume(base: Any) -> None:
    api = base["services"]["api"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert api["command"][0] == "serve"
    assert api["environment"]["ADVGUARD_REDIS_URL"] == "redis://redis:6379/0"
    assert api["environment"]["ADVGUARD_BUNDLE"] == "/opt/advguard/bundles/cifar10-resnet20"
    bundles = _volumes(api)["/bundles"]
    assert bundles["type"] == "volume" and bundles["source"] == "bundles" and bundles["read_only"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "profiles" not in api
    assert "8000:8000" in str(api["ports"]) or api["ports"][0]["target"] == 8000


def test_api_admin_port_and_neighbour_source(base: Any) -> None:
    """/metrics and the admin routes on 9000 (published on the host's loopback only), and the
    CIFAR-10 archive mounted for the demo page's neighbour images."""
    api = base["services"]["api"]
    command = api["command"]
    assert command[command.index("--admin-port") + 1] == "9000"
    # docker-compose 1.29 writes a host-ip mapping in the short form
    assert "127.0.0.1:9000:9000/tcp" in api["ports"], api["ports"]
    assert not any(isinstance(p, dict) and int(p["target"]) == 9000 for p in api["ports"])
    source = api["environment"]["ADVGUARD_NEIGHBOUR_SOURCE"]
    archive = _volumes(api)[source]
    assert archive["type"] == "bind" and archive["read_only"]
    assert archive["source"].endswith("cifar10-jpeg.tar.gz")


def test_redis_is_persistent_and_health_checked(base: Any) -> None:
    redis = base["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    # bounded, evicting statistics (TTL) and never flags (no TTL)
    assert command[command.index("--maxmemory") + 1] == "512mb"
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert _volumes(redis)["/data"]["type"] == "volume"


def test_prometheus_and_grafana_use_the_files_of_deploy(base: Any) -> None:
    prometheus = base["services"]["prometheus"]
    config = _volumes(prometheus)["/etc/prometheus"]
    assert Path(config["source"]) == REPO / "deploy" / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = base["services"]["grafana"]
    mounts = _volumes(grafana)
    assert Path(mounts["/etc/grafana/provisioning"]["source"]) == (
        REPO / "deploy" / "grafana" / "provisioning"
    )
    assert Path(mounts["/var/lib/grafana/dashboards"]["source"]) == (
        REPO / "deploy" / "grafana" / "dashboards"
    )
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "deploy/grafana/dashboards" / Path(home).name).is_file()
    for service in base["services"].values():  # pinned images, never :latest
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), image


def test_builder_runs_the_build_subcommand_into_the_bundles_volume(base: Any) -> None:
    builder = base["services"]["builder"]
    assert builder["profiles"] == ["build"]
    assert builder["image"] == base["services"]["api"]["image"]
    mounts = _volumes(builder)
    assert mounts["/data/ilsvrc"]["read_only"]
    assert mounts["/bundles"]["source"] == "bundles" and not mounts["/bundles"].get("read_only")
    command = builder["command"]
    assert command[0] == "build"
    import argparse

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_build_arguments(parser)
    args = parser.parse_args(command[1:])
    assert str(args.source) == "/data/ilsvrc" and args.split == "train"
    assert str(args.out).startswith("/bundles/")
    assert base["services"]["builder"]["deploy"]["resources"]["reservations"]["devices"]


def test_the_cpu_override_swaps_the_api_without_a_gpu(base: Any, cpu: Any) -> None:
    services = cpu["services"]
    assert services["api"]["profiles"] == ["gpu"]  # off unless someone enables it
    api_cpu = services["api-cpu"]
    assert "deploy" not in api_cpu and "profiles" not in api_cpu
    assert api_cpu["networks"]["default"]["aliases"] == ["api"]
    assert api_cpu["environment"].pop("ADVGUARD_DEVICE") == "cpu"
    gpu_api = dict(base["services"]["api"])
    for key in ("deploy", "profiles", "networks"):
        gpu_api.pop(key, None)
        api_cpu.pop(key, None)
    assert api_cpu == gpu_api, "api-cpu drifted from api: keep docker-compose.cpu.yml in sync"
    builder_cpu = services["builder-cpu"]
    assert "deploy" not in builder_cpu
    assert builder_cpu["command"][-1] == "--device=cpu"
    assert builder_cpu["command"][:-1] == base["services"]["builder"]["command"]
