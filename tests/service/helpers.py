"""Helpers of the service tests: redis-server processes, CIFAR-10 images, FGSM, uploads."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.core.guard import Guard
from app.core.images import decode_image

CIFAR_TAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PER_CLASS = 10  # test images read per class


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
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

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
