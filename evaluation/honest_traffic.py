"""Honest traffic that looks like a query attack, for the stateful detector's false-flag rate.

Built from one split's photos (the *training* split to calibrate, the *test* split to judge;
never from the attack runs). Every query is what the service would see: the client's upload
(PNG or JPEG bytes, any size) decoded and preprocessed exactly as ``POST /classify`` does
(``decode_image`` + ``image_to_pixels``), as 8-bit pixels. Kinds of client:

- ``plain``: distinct photos;
- ``resend``: one photo sent again and again (the same file);
- ``burst``: one photo and a burst of edits of it: crops, resizes, flips, brightness changes and
  JPEG recompressions at several qualities, each upload itself a PNG or a JPEG;
- ``viral``: a few photos that hundreds of clients each send once, every sender's copy one of a
  handful of circulating versions (the original, re-encodings, a resize, a crop), amid their
  own plain photos.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageEnhance

from app.core.features import image_to_pixels
from app.core.images import decode_image, encode_image, jpeg_round_trip
from app.core.models import PreprocessingPreset
from evaluation.data import eight_bit

TrafficKind = Literal["plain", "resend", "burst", "viral"]
TRAFFIC_KINDS: tuple[TrafficKind, ...] = get_args(TrafficKind)
Edit = Literal["jpeg", "crop", "resize", "flip", "brightness"]
EDITS: tuple[Edit, ...] = get_args(Edit)
JPEG_QUALITIES = (95, 90, 85, 75, 60, 50, 30)
UPLOAD_QUALITIES = (95, 90, 85, 75)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")


def as_served(data: bytes, preset: PreprocessingPreset) -> np.ndarray:
    """An upload as the service sees it: decoded and preprocessed like ``POST /classify``,
    8-bit (exact for CIFAR's 32x32 preset)."""
    pixels = image_to_pixels(decode_image(data, min_size=preset.resize), preset)
    return eight_bit(pixels.numpy())


def stored(pixels: np.ndarray, quality: int | None, preset: PreprocessingPreset) -> np.ndarray:
    """(n, 3, H, W) float images in [0, 1] (adversarials) -> the 8-bit pixels the service
    decodes from each one's file (PNG when ``quality`` is None, else a JPEG at that quality)."""
    files = eight_bit(pixels)
    return np.stack([as_served(encode_image(to_pil(image), quality), preset) for image in files])


def edit(image: np.ndarray, kind: Edit, rng: np.random.Generator) -> Image.Image:
    """One honest edit of a photo ((3, H, W) uint8), with random parameters."""
    picture = to_pil(image)
    width, height = picture.size
    if kind == "jpeg":
        return jpeg_round_trip(picture, int(rng.choice(JPEG_QUALITIES)))
    if kind == "crop":
        side = int(rng.integers(int(0.75 * min(width, height)), min(width, height)))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        return picture.crop((left, top, left + side, top + side))
    if kind == "resize":
        scale = float(rng.choice([0.75, 0.875, 1.25, 1.5, 2.0]))
        return picture.resize((round(width * scale), round(height * scale)))
    if kind == "flip":
        return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factor = float(rng.choice([rng.uniform(0.7, 0.95), rng.uniform(1.05, 1.3)]))
    return ImageEnhance.Brightness(picture).enhance(factor)


def upload_quality(rng: np.random.Generator) -> int | None:
    """Half the uploads are PNG, half JPEG at a camera or app quality."""
    return None if rng.random() < 0.5 else int(rng.choice(UPLOAD_QUALITIES))


def edited_upload(
    image: np.ndarray, rng: np.random.Generator, preset: PreprocessingPreset
) -> np.ndarray:
    kind: Edit = EDITS[int(rng.integers(len(EDITS)))]
    return as_served(encode_image(edit(image, kind, rng), upload_quality(rng)), preset)


@dataclass(frozen=True)
class HonestQuery:
    client: str
    kind: TrafficKind
    image: np.ndarray  # (3, H, W) uint8, as served
    circulating: bool = False  # a copy of a viral photo


@dataclass(frozen=True)
class TrafficPlan:
    """How much honest traffic of each kind (clients per kind, queries per client)."""

    clients: int = 1000
    plain_queries: int = 20
    resends: int = 10
    burst_edits: int = 15
    viral_images: int = 4
    viral_versions: int = 6
    viral_plain: int = 9


def viral_versions(
    image: np.ndarray, count: int, rng: np.random.Generator, preset: PreprocessingPreset
) -> list[np.ndarray]:
    """The versions of a viral photo in circulation: the original PNG, re-encodings at a few
    qualities, and edited copies (a resize, a crop, ...)."""
    picture = to_pil(image)
    versions = [as_served(encode_image(picture, None), preset)]
    for quality in (90, 75):
        versions.append(as_served(encode_image(picture, quality), preset))
    while len(versions) < count:
        versions.append(edited_upload(image, rng, preset))
    return versions[:count]


def honest_clients(
    pixels: np.ndarray, plan: TrafficPlan, preset: PreprocessingPreset, seed: int, prefix: str
) -> dict[TrafficKind, list[list[HonestQuery]]]:
    """Per kind, ``plan.clients`` clients, each a list of its queries in order."""
    rng = np.random.default_rng(seed)
    n = len(pixels)

    def served(row: int) -> np.ndarray:
        return as_served(encode_image(to_pil(pixels[row]), None), preset)

    out: dict[TrafficKind, list[list[HonestQuery]]] = {kind: [] for kind in TRAFFIC_KINDS}
    for c in range(plan.clients):
        rows = rng.choice(n, size=plan.plain_queries, replace=False)
        client = f"{prefix}-plain-{c}"
        out["plain"].append([HonestQuery(client, "plain", served(int(r))) for r in rows])
    for c in range(plan.clients):
        photo = served(int(rng.integers(n)))
        client = f"{prefix}-resend-{c}"
        out["resend"].append([HonestQuery(client, "resend", photo) for _ in range(plan.resends)])
    for c in range(plan.clients):
        row = int(rng.integers(n))
        client = f"{prefix}-burst-{c}"
        burst = [HonestQuery(client, "burst", served(row))]
        burst += [
            HonestQuery(client, "burst", edited_upload(pixels[row], rng, preset))
            for _ in range(plan.burst_edits)
        ]
        out["burst"].append(burst)
    photos = rng.choice(n, size=plan.viral_images, replace=False)
    versions = [viral_versions(pixels[int(r)], plan.viral_versions, rng, preset) for r in photos]
    for c in range(plan.clients):
        client = f"{prefix}-viral-{c}"
        copies = versions[c % plan.viral_images]
        queries = [
            HonestQuery(client, "viral", served(int(r)))
            for r in rng.choice(n, size=plan.viral_plain, replace=False)
        ]
        position = int(rng.integers(len(queries) + 1))
        copy = copies[int(rng.integers(len(copies)))]
        queries.insert(position, HonestQuery(client, "viral", copy, circulating=True))
        out["viral"].append(queries)
    return out


def interleave(clients: Sequence[list[HonestQuery]], seed: int) -> Iterator[HonestQuery]:
    """All clients' queries on one timeline: a random interleaving that keeps each client's
    order (every position is drawn in proportion to the queries each client has left)."""
    rng = np.random.default_rng(seed)
    owners = np.concatenate([np.full(len(queries), i) for i, queries in enumerate(clients)])
    rng.shuffle(owners)
    cursor = [0] * len(clients)
    for owner in owners.tolist():
        yield clients[owner][cursor[owner]]
        cursor[owner] += 1


def train_photos(tar_path: Path, limit: int) -> np.ndarray:
    """The first ``limit`` training photos of a CIFAR-10 JPEG archive (``train/<class>/...``),
    (n, 3, 32, 32) uint8 as stored: the raw material of honest look-alike traffic for tests and
    benchmarks that need a few photos without the evaluation's cached splits."""
    found = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith("train/") and member.name[-4:] == ".jpg":
                handle = tar.extractfile(member)
                assert handle is not None
                picture = Image.open(io.BytesIO(handle.read())).convert("RGB")
                found.append(np.asarray(picture).transpose(2, 0, 1))
                if len(found) == limit:
                    break
    return np.stack(found)
