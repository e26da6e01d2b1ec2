"""Synthetic inputs of the GPU checks: JPEGs, random-weight models and an ILSVRC-sized index.

Nothing ILSVRC-sized can travel to the GPU machine (64 MiB in all), so the checks make their
inputs there, fast and seeded:

- JPEGs: a smooth random colour field with grain, class-tinted, at quality 90. Decoding cost
  depends on the pixel count and the entropy-coded size, so at 500x375 they decode like ILSVRC
  photos of that size (~80 KB each, ILSVRC's mean is ~110 KB). A folder of N images cycles
  through a few hundred distinct encodings: the builder decodes every file anyway, and encoding
  20,000 distinct JPEGs would cost the check ~20 s of its 8 minutes for nothing measured.
- Weights: torchvision's initialisation (seeded) saved as a state dict, loaded like real ones.
- An enlarged bundle: a real bundle (the builder's own output) whose indexed layer gets a
  synthetic flat index of N rows in its processed space (``bench.search_scale.clustered``:
  Gaussian clusters) and matching labels, checksummed into its manifest. Search cost does not
  depend on the values, so the service then pays ILSVRC-scale search on a real bundle layout.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.core import search
from app.core.bundle import read_manifest, verify_files, write_manifest
from app.core.models import build_model, file_sha256

JPEG_QUALITY = 90
GRAIN = 14.0  # std of the per-pixel noise, in 8-bit levels


def synthetic_jpeg(rng: np.random.Generator, size: tuple[int, int], tint: int) -> bytes:
    """One ``size`` (width, height) JPEG: a bicubic-smoothed random field plus grain."""
    width, height = size
    coarse = rng.uniform(0, 255, (max(height // 24, 2), max(width // 24, 2), 3))
    smooth = Image.fromarray(coarse.astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    pixels = np.asarray(smooth, dtype=np.float32) + rng.normal(0, GRAIN, (height, width, 3))
    pixels[..., tint % 3] += 24.0
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY
    )
    return buffer.getvalue()


def jpegs(count: int, size: tuple[int, int], seed: int = 0, classes: int = 10) -> list[bytes]:
    """``count`` distinct JPEGs, image i tinted by class i % classes."""
    rng = np.random.default_rng(seed)
    return [synthetic_jpeg(rng, size, i % classes) for i in range(count)]


def jpeg_folder(
    root: Path, images: int, classes: int, size: tuple[int, int], distinct: int, seed: int = 0
) -> Path:
    """An ImageFolder of ``images`` JPEGs in ``classes`` folders (``class_00``...), the files
    cycling through ``distinct`` encodings per class."""
    per_class = [jpegs(distinct // classes or 1, size, seed + c, classes=1) for c in range(classes)]
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        encodings = per_class[c]
        (root / f"class_{c:02d}" / f"{i:06d}.jpg").write_bytes(encodings[i % len(encodings)])
    return root


def random_weights(arch: str, classes: int, path: Path, seed: int = 0) -> Path:
    """A seeded random-weight ``arch`` with ``classes`` outputs, saved as a state dict."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(arch, classes).state_dict(), path)
    return path


def enlarge_bundle(bundle: Path, out: Path, vectors: np.ndarray, labels: np.ndarray) -> Path:
    """A copy of ``bundle`` at ``out`` whose one indexed layer holds ``vectors`` (a flat index;
    (n, the layer's output dims)) labelled ``labels % classes``; manifest counts and checksums
    updated, so it loads and verifies like any bundle. The detector's reference statistics and
    threshold stay the original bundle's: decisions on it measure nothing but agreement."""
    manifest = read_manifest(bundle)
    indexed = [layer for layer in manifest.detector.layers if layer.index_file is not None]
    if len(indexed) != 1:
        raise ValueError(f"want one indexed layer, {bundle} has {len(indexed)}")
    layer = indexed[0]
    assert layer.index_file is not None
    if vectors.shape[1] != layer.output_dim or vectors.shape[0] != labels.shape[0]:
        raise ValueError(f"need (n, {layer.output_dim}) vectors and n labels")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    index = search.new_index(layer.output_dim, "flat")
    search.add_vectors(index, np.array_split(vectors, max(1, vectors.shape[0] // 100_000)))
    search.save_index(index, out / layer.index_file)
    classes = manifest.model.num_classes
    new_labels = (labels % classes).astype(np.int32)
    np.save(out / manifest.detector.labels_file, new_labels)
    files = dict(manifest.files)
    for name in (layer.index_file, manifest.detector.labels_file):
        files[name] = file_sha256(out / name)
    per_class = np.bincount(new_labels, minlength=classes)
    counts = manifest.counts.model_copy(
        update={"indexed": int(vectors.shape[0]), "indexed_per_class": per_class.tolist()}
    )
    enlarged = manifest.model_copy(
        update={"name": f"{manifest.name}-{vectors.shape[0]}", "counts": counts, "files": files}
    )
    write_manifest(out, enlarged)
    verify_files(out, read_manifest(out))
    return out
