"""Demo traffic for the dashboards: honest clients and attacking clients against a local api.

    python deploy/traffic.py --url http://127.0.0.1:8000 --images path/to/cifar10/test \
        --honest 4 --attackers 1 --duration 120

Honest clients upload images as they are; attacking clients upload FGSM adversarials made
white-box on the bundle's own model (the paper's threat model), so their predictions are rejected
more often and the tracker flags them. Without ``--images``, smooth random pictures stand in for
the honest images (they are out of distribution: the rejection ratio then means little).

Bounded on purpose: loopback or private (compose network) addresses only, at most one hour, at
most 200 requests per second in total. Standard library only, plus torch for the attacks.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

MAX_DURATION_S = 3600.0
MAX_RATE = 200.0
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "cifar10-resnet20"


def check_local(url: str) -> None:
    """Refuse any target that is not loopback or a private network address (compose, k8s)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"traffic: not an http(s) url: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise SystemExit(f"traffic: cannot resolve {parts.hostname}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not (address.is_loopback or address.is_private):
            raise SystemExit(
                f"traffic: {parts.hostname} resolves to {address}, which is neither loopback nor "
                "private; this script only drives a local demo"
            )


def to_png(pixels: np.ndarray) -> bytes:
    """HxWx3 float array in [0, 1] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def synthetic_images(count: int, size: int, seed: int) -> list[bytes]:
    """Smooth random colour fields (upsampled noise): stand-ins when no images are given."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.uniform(0, 1, (4, 4, 3)).astype(np.float32)
        big = np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        )
        images.append(to_png(big.astype(np.float32) / 255.0))
    return images


def load_images(source: Path, count: int) -> list[bytes]:
    """Up to ``count`` images of an ImageFolder directory or tar, spread over its classes."""
    from index_builder.sources import open_source

    opened = open_source(source, None)
    listing = opened.listing()
    entries = listing.entries
    step = max(1, len(entries) // count)
    chosen = entries[::step][:count]
    if opened.streaming:
        wanted = {e.key for e in chosen}
        return [data for _, data in opened.stream(wanted)]
    return [opened.read(e) for e in chosen]


def fgsm_images(images: list[bytes], bundle: Path, epsilon: float) -> list[bytes]:
    """One FGSM step (L-inf ``epsilon`` in [0, 1] pixel units) on the bundle's model, on CPU."""
    import torch

    from app.core.bundle import read_manifest
    from app.core.features import FeatureNetwork, image_to_pixels
    from app.core.images import decode_image
    from app.core.models import PRESETS, load_model

    manifest = read_manifest(bundle)
    preset = PRESETS[manifest.model.preprocessing.preset]
    model = load_model(
        manifest.model.arch, bundle / manifest.model.weights_file, manifest.model.num_classes
    )
    layer = manifest.detector.layers[0].name
    network = FeatureNetwork(model, [layer], preset).eval()
    adversarial = []
    for data in images:
        image = decode_image(data, min_size=preset.resize)
        pixels = image_to_pixels(image, preset).unsqueeze(0).requires_grad_(True)
        logits = network(pixels).logits
        label = logits.argmax(dim=1)
        loss = torch.nn.functional.cross_entropy(logits, label)
        (grad,) = torch.autograd.grad(loss, pixels)
        attacked = (pixels + epsilon * grad.sign()).clamp(0, 1).detach()
        adversarial.append(to_png(attacked[0].permute(1, 2, 0).numpy()))
    return adversarial


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, client: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[f"{client.rsplit('-', 1)[0]}:{outcome}"] += 1


def client_loop(
    url: str,
    client: str,
    images: list[bytes],
    interval: float,
    deadline: float,
    max_requests: int,
    api_key: str | None,
    tally: Tally,
) -> None:
    sent = 0
    next_at = time.monotonic()
    while sent < max_requests and time.monotonic() < deadline:
        body, content_type = multipart(images[sent % len(images)])
        headers = {"Content-Type": content_type, "X-Client-ID": client}
        if api_key:
            headers["X-API-Key"] = api_key
        request = urllib.request.Request(f"{url}/classify", body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                outcome = str(json.loads(response.read()).get("decision", response.status))
        except urllib.error.HTTPError as exc:
            outcome = f"http_{exc.code}"
        except (urllib.error.URLError, OSError):
            outcome = "unreachable"
        tally.add(client, outcome)
        sent += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", type=Path, help="ImageFolder dir or tar (e.g. CIFAR-10 test)")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="for the attacks")
    parser.add_argument("--pool", type=int, default=64, help="distinct images per kind")
    parser.add_argument("--honest", type=int, default=4, help="honest clients")
    parser.add_argument("--attackers", type=int, default=1, help="attacking clients")
    parser.add_argument("--epsilon", type=float, default=8 / 255, help="FGSM step")
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s per client")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per client")
    parser.add_argument("--api-key", help="X-API-Key header, when the api requires keys")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clients = args.honest + args.attackers
    if clients < 1 or args.rate <= 0 or args.duration <= 0 or args.pool < 1:
        parser.error("need at least one client, and positive --rate, --duration and --pool")
    if args.duration > MAX_DURATION_S:
        parser.error(f"--duration is capped at {MAX_DURATION_S:.0f} s")
    if args.rate * clients > MAX_RATE:
        parser.error(f"--rate x clients is capped at {MAX_RATE:.0f} requests/s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = args.url.rstrip("/")
    check_local(url)
    if args.images is not None:
        honest = load_images(args.images, args.pool)
    else:
        honest = synthetic_images(args.pool, 32, args.seed)
    attacks = fgsm_images(honest, args.bundle, args.epsilon) if args.attackers else []
    tally = Tally()
    deadline = time.monotonic() + args.duration
    threads = [
        threading.Thread(
            target=client_loop,
            args=(
                url,
                f"{kind}-{i}",
                pool,
                1.0 / args.rate,
                deadline,
                args.max_requests,
                args.api_key,
                tally,
            ),
            daemon=True,
        )
        for kind, count, pool in (
            ("honest", args.honest, honest),
            ("attacker", args.attackers, attacks),
        )
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(dict(sorted(tally.outcomes.items()))))
    return 0 if tally.outcomes else 1


if __name__ == "__main__":
    sys.exit(main())
