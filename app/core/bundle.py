"""Reading and verifying bundles on disk (writing is the builder's job, through ``write_files``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from app.core.errors import BundleError
from app.core.manifest import MANIFEST_NAME, Manifest
from app.core.models import file_sha256


def read_manifest(bundle_dir: Path) -> Manifest:
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME}")
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as exc:
        raise BundleError(f"invalid {path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"invalid {path}: {exc}") from exc
    except ValidationError as exc:  # one line: the count and the first problem
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BundleError(f"invalid {path}: {where}: {first['msg']}{more}") from exc


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Every listed file exists with its recorded sha256; otherwise refuse the bundle."""
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(
                f"bundle file {name} does not match the manifest (sha256 {actual[:12]}..., "
                f"manifest says {expected[:12]}...): the bundle was modified or corrupted"
            )
    referenced = {manifest.model.weights_file, manifest.detector.labels_file}
    calibration = manifest.calibration
    optional = [
        manifest.detector.sources_file,
        calibration.scores_file,
        calibration.honest_scores_file,
        calibration.honest_classes_file,
        calibration.reference_statistics_file,
        calibration.threshold_statistics_file,
    ]
    for layer in manifest.detector.layers:
        optional += [
            layer.index_file,
            layer.processing_file,
            layer.calibration_scores_file,
            layer.class_density_file,
        ]
    referenced.update(name for name in optional if name is not None)
    unlisted = sorted(referenced - set(manifest.files))
    if unlisted:
        raise BundleError(f"manifest references files without a checksum: {unlisted}")
    if manifest.files[manifest.model.weights_file] != manifest.model.weights_sha256:
        raise BundleError("the model weights' sha256 differs from the manifest's model entry")


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    path = bundle_dir / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(path)


def load_honest_scores(bundle_dir: Path, manifest: Manifest) -> np.ndarray:
    """The held-out scores that stand for honest traffic: every held-out image's score (errors
    included) when the bundle has them, else (older bundles) the correctly classified ones."""
    name = manifest.calibration.honest_scores_file or manifest.calibration.scores_file
    scores: np.ndarray = np.load(bundle_dir / name, allow_pickle=False).astype(np.float64)
    return scores


def load_honest_classes(bundle_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """The predicted class of each honest score (``load_honest_scores``), or None for bundles
    built before the builder recorded them. Refused when it does not fit the scores."""
    name = manifest.calibration.honest_classes_file
    if name is None:
        return None
    classes: np.ndarray = np.load(bundle_dir / name, allow_pickle=False)
    scores_name = manifest.calibration.honest_scores_file
    if scores_name is None:
        raise BundleError(f"{name} is listed without the honest scores it labels")
    scores = np.load(bundle_dir / scores_name, mmap_mode="r", allow_pickle=False)
    if classes.shape != scores.shape or classes.dtype.kind not in "iu":
        raise BundleError(f"{name} does not hold one class index per honest score")
    if classes.size and not 0 <= int(classes.min()) <= int(classes.max()) < manifest.counts.classes:
        raise BundleError(f"{name} holds a class index outside the bundle's classes")
    return classes.astype(np.int64)


def load_sources(bundle_dir: Path, manifest: Manifest) -> list[str] | None:
    """Each indexed row's source reference (``detector.sources_file``), or None for bundles built
    before the builder recorded them. The file was verified against the manifest's sha256."""
    name = manifest.detector.sources_file
    if name is None:
        return None
    references = json.loads((bundle_dir / name).read_text())
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise BundleError(f"{name} is not a JSON list of source references")
    if len(references) != manifest.counts.indexed:
        indexed = manifest.counts.indexed
        raise BundleError(f"{name} lists {len(references)} sources for {indexed} indexed rows")
    return references
