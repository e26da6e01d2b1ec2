"""Helpers of the service tests: redis-server processes, CIFAR-10 images, FGSM, uploads, and an
event loop on its own thread for driving the service's loop-bound workers from blocking code."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.core.flagging import FlagPolicy, WindowParams
from app.core.guard import Guard
from app.core.images import decode_image
from bench.common import launch_redis

CIFAR_TAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = 10  # test images read per class

T = TypeVar("T")


class LoopThread:
    """An event loop running on its own thread. The batch worker's and the screening thread's
    ``submit`` must run on an event loop (their futures belong to it), while the tests that
    drive them block on threading events: ``call`` runs a function on the loop and ``result``
    waits there for a future, both from the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async def run() -> T:
            return function(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30.0)

    def result(self, future: asyncio.Future[T], timeout: float = 30.0) -> T:
        async def wait() -> T:
            return await future

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30.0)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """One redis-server on a loopback port; ``kill`` and ``start`` again on the same port."""

    def __init__(self, port: int, workdir: Path, persistent: bool = False):
        self.port = port
        self.workdir = workdir
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self.process = launch_redis(self.port, self.workdir, *persistence)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)


@dataclass(frozen=True)
class LabelledImage:
    name: str
    data: bytes
    label: int


def png_bytes(pixels: torch.Tensor) -> bytes:
    array = (pixels.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fgsm(guard: Guard, images: list[LabelledImage], eps: float = 8 / 255) -> list[bytes]:
    """One FGSM step on the bundle's own network, as PNG files."""
    pixels = torch.stack([guard.pixels(decode_image(image.data)) for image in images])
    labels = torch.tensor([image.label for image in images])
    pixels.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(guard.network(pixels).logits, labels)
    (grad,) = torch.autograd.grad(loss, pixels)
    adversarial = (pixels + eps * grad.sign()).clamp(0.0, 1.0).detach()
    return [png_bytes(x) for x in adversarial]


def upload(client: TestClient, data: bytes, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        "/classify", files={"file": ("image", data, "application/octet-stream")}, headers=headers
    )


REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisClusterProcesses:
    """A local Redis Cluster of three masters, no replicas, on free loopback ports.

    Each node is ``redis-server --cluster-enabled yes`` with its own config file and directory
    (so a killed node restarts with its id and slots); ``redis-cli --cluster create`` assigns the
    slots, and ``start`` returns once every node reports ``cluster_state:ok``. The node timeout is
    short (2 s) so that a node restarted after a kill is serving again within seconds."""

    NODE_TIMEOUT_MS = 2000

    def __init__(self, workdir: Path, masters: int = 3):
        self.workdir = workdir
        self.ports: list[int] = []
        while len(self.ports) < masters:
            port = free_cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The first node: the cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        directory = self.workdir / str(port)
        directory.mkdir(exist_ok=True)
        self.processes[port] = launch_redis(
            port,
            directory,
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(directory / "nodes.conf"),
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
            "--appendonly", "no",
        )  # fmt: skip

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        created = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}")
        self.wait_ok()

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node says cluster_state:ok."""
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=0.5)
            try:
                while True:
                    with contextlib.suppress(redis.RedisError):
                        if client.cluster("info")["cluster_state"] == "ok":
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {port} never reached cluster_state:ok")
                    time.sleep(0.1)
            finally:
                client.close()

    def port_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        client = redis.Redis(port=self.ports[0], socket_timeout=1)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        finally:
            client.close()
        raise LookupError(f"no node serves slot {slot}")

    def kill_node(self, port: int) -> None:
        process = self.processes.pop(port)
        process.kill()
        process.wait(10)

    def kill(self) -> None:
        for port in list(self.processes):
            self.kill_node(port)


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too. Redis Cluster needs
    P <= 55535, so the kernel's ephemeral ports (free_port) do not do: draw below them."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(15_000, 30_000)
        if _is_free(port) and _is_free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def admin_of(client: TestClient) -> TestClient:
    """A client of the admin listener (/metrics, /clients) of ``client``'s service: the admin app
    shares the public app's state, so it sees the service ``client``'s lifespan started."""
    app: Any = client.app
    return TestClient(app.state.admin_app)


def flag_policy(kind: str = "mean", threshold: float = 0.4, min_requests: int = 3) -> FlagPolicy:
    """A flag policy for the trackers' tests: ``kind`` over the score window, flagging below
    ``threshold`` after ``min_requests``, with the window's EWMA and CUSUM settings fixed."""
    return FlagPolicy(kind, threshold, min_requests, WindowParams(0.05, 0.35))  # type: ignore[arg-type]
