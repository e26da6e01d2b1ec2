"""Machine description and result writing shared by the benchmark scripts."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
import torch

from app.core import search
from app.core.errors import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


# Set by ``advguard bench``: the words of that command, which the process's argv cannot tell
# apart from any other ``advguard`` subcommand once the benchmark's ``main`` is called.
_invocation: list[str] | None = None


def set_invocation(words: list[str]) -> None:
    """Record how the running benchmark was invoked (``advguard bench <name> [args]``)."""
    global _invocation
    _invocation = list(words)


def command_line() -> str:
    """The command as a user would type it, to rerun the measurement.

    ``advguard bench <name> [args]`` when run through the CLI, ``python -m bench.<script> [args]``
    when run as a module, ``python bench/<script>.py [args]`` when run as a file.
    """
    if _invocation is not None:
        words = _invocation
    else:
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        runner = ["-m", spec.name] if spec is not None else [sys.argv[0]]
        words = ["python", *runner, *sys.argv[1:]]
    return " ".join(shlex.quote(word) for word in words)


@contextmanager
def faiss_selection_only() -> Iterator[None]:
    """Every search through ``app.core.search.search`` uses faiss's own k-selection (the code
    path before the threshold selection): the reference the search benchmarks measure against.
    It sets a module setting of the search for the process: benchmarks only."""
    before = search.THRESHOLD_SELECTION_MIN_K
    search.THRESHOLD_SELECTION_MIN_K = sys.maxsize
    try:
        yield
    finally:
        search.THRESHOLD_SELECTION_MIN_K = before


def write_results(name: str, results: dict[str, Any], table: str) -> Path:
    """bench/results/<name>.json (every number) and <name>.md (the table, command, machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"command": command_line(), "machine": machine(), "measured_at": _now()}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **results}, indent=2) + "\n")
    host = meta["machine"]
    md = (
        f"# {name}\n\n{table.strip()}\n\n"
        f"Command: `{meta['command']}`  \n"
        f"Machine: {host['cpu']}, {host['cores']} cores, GPU: {host['gpu']}, "
        f"torch {host['torch']} ({host['torch_threads']} threads); "
        f"measured {meta['measured_at']}.\n"
    )
    (RESULTS / f"{name}.md").write_text(md)
    return RESULTS / f"{name}.md"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch_redis(port: int, workdir: Path, *options: str) -> subprocess.Popen[bytes]:
    """A redis-server on loopback ``port`` without snapshots, with ``options`` (persistence,
    cluster mode, maxmemory), returned once it answers PING: the one way the benchmarks and the
    tests start one."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    process = subprocess.Popen(
        [*command, "--save", "", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return process
            except redis.RedisError:
                if time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


def start_redis(workdir: Path, maxmemory: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server without persistence on a free loopback port, bounded when asked (LRU
    among keys with a TTL, as the compose file sets it): (its process, its URL)."""
    port = free_port()
    options = ["--appendonly", "no"]
    if maxmemory:
        options += ["--maxmemory", maxmemory, "--maxmemory-policy", "volatile-lru"]
    return launch_redis(port, workdir, *options), f"redis://127.0.0.1:{port}/0"


def advguard_command() -> list[str]:
    """How to run ``advguard``: its console script beside this Python when the project is
    installed, else ``python -m app.cli`` (a checkout on PYTHONPATH, as on the GPU machine,
    where the project is not installed and only its dependencies are, from carried wheels)."""
    script = Path(sys.executable).parent / "advguard"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "app.cli"]


@contextmanager
def serve(
    env: dict[str, str], device: str = "cpu"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``advguard serve`` on a free loopback port (and a free admin port: ``admin_base``),
    ready; terminated (SIGTERM) on exit."""
    port = free_port()
    command = [*advguard_command(), "serve", "--port", str(port), "--device", device]
    command += ["--admin-port", str(free_port())]
    server = subprocess.Popen([*command, "--log-level", "warning"], env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:  # it refused its settings: its reason is on stderr
                raise ConfigError(
                    f"advguard serve exited with code {server.returncode} before it was ready "
                    "(its reason is printed above)"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready within 120 s")
            time.sleep(0.2)
        yield base, server
    finally:
        server.terminate()
        server.wait(60)


def admin_base(server: subprocess.Popen[bytes]) -> str:
    """The admin listener (/metrics) of a service ``serve`` started: its --admin-port."""
    args = [str(a) for a in server.args]  # type: ignore[union-attr]
    return f"http://127.0.0.1:{args[args.index('--admin-port') + 1]}"


def multipart_request(
    path: str, data: bytes, field: str = "file", filename: str = "x.jpg", host: str = "bench"
) -> bytes:
    """A complete HTTP/1.1 POST with one multipart file part, ready to write to a socket."""
    boundary = "advguardbenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams, for load generators.

    The client shares the machine's cores with the service, so it must cost little: httpx's
    connection pool does work proportional to its connections on every request (here ~90
    requests/s in all at 64 or 512 connections against ~2,000/s from this client on /healthz),
    which made a 512-client burst measure the client's own queue. Requests are prebuilt bytes
    (``multipart_request``); responses need a Content-Length (uvicorn's JSON responses have one).
    A response with ``Connection: close`` or a broken connection makes the next request
    reconnect; transport errors raise ``OSError`` / ``asyncio.IncompleteReadError``.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        try:
            self._writer.write(raw)
            head = await self._reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await self._reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


@contextmanager
def busy_interpreter() -> Iterator[None]:
    """A thread that runs Python bytecode and never waits, as the service's event loop does at
    saturation: every thread that gives the interpreter lock back (numpy over a large array)
    must then wait for it."""
    stop = threading.Event()

    def spin() -> None:
        total = 0
        while not stop.is_set():
            for i in range(1000):
                total += i

    thread = threading.Thread(target=spin, name="busy-interpreter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class PairedRatio:
    """One service's throughput over another's, round by round (``paired_ratio``)."""

    ratio: float  # geometric mean of the per-round ratios
    low: float  # the interval's ends (``level``)
    high: float
    rounds: int
    level: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "ratio": round(self.ratio, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "rounds": self.rounds,
            "level": self.level,
        }


def paired_ratio(
    numerators: Sequence[float],
    denominators: Sequence[float],
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedRatio:
    """The ratio of two services loaded in turn, with an interval over rounds. A round's two
    slices run within one round (back to back for neighbours in the order, a few slices apart
    otherwise; the order flips every round), under nearly the same load of a shared machine, so
    each round's ratio cancels most of the drift that the ratio of the totals averages over, and
    the spread of the rounds' ratios says how sure the figure is: the geometric mean of the
    per-round ratios, and a percentile-bootstrap interval of it (rounds resampled; ``seed`` makes
    it repeatable)."""
    top = np.asarray(numerators, dtype=np.float64)
    bottom = np.asarray(denominators, dtype=np.float64)
    if top.shape != bottom.shape or top.ndim != 1 or top.size == 0:
        raise ValueError("need the same positive number of rounds on both sides")
    if (top <= 0).any() or (bottom <= 0).any():
        raise ValueError("a round with no throughput has no ratio")
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")
    logs = np.log(top / bottom)
    picks = np.random.default_rng(seed).integers(0, logs.size, size=(resamples, logs.size))
    means = logs[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedRatio(
        float(np.exp(logs.mean())), float(np.exp(low)), float(np.exp(high)), logs.size, level
    )


def ratio_by_round(
    numerators: Sequence[float], denominators: Sequence[float]
) -> dict[str, float | int] | None:
    """``paired_ratio(...).as_dict()`` for a results file, or None when a round answered nothing
    (a slice of a failing service): the report of a long run must still be written."""
    if min(numerators, default=0.0) <= 0 or min(denominators, default=0.0) <= 0:
        return None
    return paired_ratio(numerators, denominators).as_dict()


def interval_verdict(found: Mapping[str, float | int] | None, target: float) -> str:
    """A throughput target read on a by-round interval (``paired_ratio``): "met" when the whole
    interval clears it, "missed" when the whole interval falls short, else "not shown either
    way" (one run on shared cores, or too few rounds, cannot tell); "not measured" without
    rounds. A point ratio alone is never a verdict: on two shared cores one run's interval is
    ten points wide."""
    if found is None:
        return "not measured"
    if found["low"] >= target:
        return "met"
    if found["high"] < target:
        return "missed"
    return "not shown either way"


def ratio_cell(found: Mapping[str, float | int] | None) -> str:
    """``87.1% (85.0%-89.3%)`` for a report; ``-`` when there is none."""
    if found is None:
        return "-"
    return f"{found['ratio']:.1%} ({found['low']:.1%}-{found['high']:.1%})"
