"""Kubernetes manifests: validated (strict: unknown fields fail) against the Kubernetes OpenAPI
schemas that kubernetes-validate ships offline, for the oldest and newest versions it carries
that we support, then checked for how the pieces fit together."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.service.cli import register as register_service
from index_builder.cli import add_build_arguments
from tests.deploy.helpers import DEPLOY

K8S = DEPLOY / "k8s"
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_schema(version: str) -> None:
    docs = documents()
    kinds = {d["kind"] for _, d in docs}
    assert kinds >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet",
        "ConfigMap", "Secret", "Job", "PersistentVolumeClaim", "NetworkPolicy",
    }  # fmt: skip
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_the_validator_rejects_a_wrong_manifest() -> None:
    (api,) = by_kind("Deployment").values()
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_cli_validates_the_directory_too(tool: Callable[[str], str]) -> None:
    files = [str(p) for p in sorted(K8S.glob("*.yaml"))]
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *files],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _serve_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    register_service(commands)
    return parser.parse_args(args)


def test_the_api_deployment_uses_a_gpu_probes_and_drains() -> None:
    (api,) = by_kind("Deployment").values()
    pod = api["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    args = _serve_args(container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert container["ports"][0]["containerPort"] == args.port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "admin": args.admin_port}
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.admin_port)  # /metrics is admin-only
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    # preStop, then SIGTERM -> drain for --graceful-shutdown-s, all inside the grace period
    assert int(pre_stop[1]) + args.graceful_shutdown_s < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    sources = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert sources == set(by_kind("ConfigMap")) | set(by_kind("Secret"))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims <= set(by_kind("PersistentVolumeClaim"))


def test_services_hpa_and_pdb_select_the_right_pods() -> None:
    deployment = by_kind("Deployment")["advguard-api"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind("Service")["advguard-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = by_kind("PodDisruptionBudget")["advguard-api"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = by_kind("HorizontalPodAutoscaler")["advguard-api"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "advguard-api"
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    metric_names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if "pods" in m}
    assert metric_names == {"advguard_queue_depth"}
    redis = by_kind("StatefulSet")["advguard-redis"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    limit = redis["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert (args[args.index("--maxmemory") + 1], limit) == ("512mb", "1Gi")  # room for the fork
    config = by_kind("ConfigMap")["advguard-config"]["data"]
    assert config["ADVGUARD_REDIS_URL"] == "redis://advguard-redis:6379/0"
    assert set(by_kind("Secret")["advguard-secrets"]["stringData"]) == {
        "ADVGUARD_API_KEYS", "ADVGUARD_ADMIN_TOKEN", "ADVGUARD_STATEFUL_SECRET"
    }  # fmt: skip


def test_the_admin_port_is_reachable_by_prometheus_and_admins_only() -> None:
    """The public Service exposes only the public port; the NetworkPolicy admits anyone to 8000
    and only Prometheus and admin-labelled pods to 9000."""
    deployment = by_kind("Deployment")["advguard-api"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    public = by_kind("Service")["advguard-api"]
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    admin = by_kind("Service")["advguard-api-admin"]
    assert admin["spec"]["type"] == "ClusterIP"
    assert [p["targetPort"] for p in admin["spec"]["ports"]] == ["admin"]
    policy = by_kind("NetworkPolicy")["advguard-api"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule for rule in policy["ingress"]}
    assert set(rules) == {(8000,), (9000,)}
    assert "from" not in rules[(8000,)]  # the public port: anyone
    allowed = [peer["podSelector"]["matchLabels"] for peer in rules[(9000,)]["from"]]
    assert allowed == [{"app.kubernetes.io/name": "prometheus"}, {"advguard.io/admin": "true"}]


def test_the_builder_job_runs_torchrun_advguard_build() -> None:
    (job,) = by_kind("Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    nproc = next(a for a in args if a.startswith("--nproc_per_node="))
    assert int(nproc.split("=")[1]) == container["resources"]["limits"]["nvidia.com/gpu"]
    start = args.index("advguard")
    assert "--no-python" in args[:start] and args[start + 1] == "build"
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    build = parser.parse_args(args[start + 2 :])
    assert str(build.out).startswith("/bundles/")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data/ilsvrc"]["readOnly"] and not mounts["/bundles"].get("readOnly")
