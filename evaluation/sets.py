"""The paper's image sets (Section 5) and the adversarial sets built from them, cached on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evaluation.attacks import AttackOutput
from evaluation.data import eight_bit, save_npz


@dataclass(frozen=True)
class Selection:
    authentic: np.ndarray  # rows of the split: correctly classified, per_class per class
    errors: np.ndarray  # rows of the split: misclassified, up to per_class per true class
    targets: np.ndarray  # (len(authentic),) a random class != true class per authentic image


def select_sets(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, per_class: int, seed: int
) -> Selection:
    """Authentic: ``per_class`` random correctly classified images of each class; Authentic
    Errors: up to ``per_class`` random misclassified images of each class; a random target
    class (never the true one) for each authentic image."""
    rng = np.random.default_rng(seed)
    authentic: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(members.size)]
        correct = members[predictions[members] == c]
        wrong = members[predictions[members] != c]
        authentic.append(np.sort(correct[:per_class]))
        errors.append(np.sort(wrong[:per_class]))
    chosen = np.concatenate(authentic)
    offsets = rng.integers(1, num_classes, size=chosen.size)
    targets = (labels[chosen] + offsets) % num_classes
    return Selection(chosen, np.concatenate(errors), targets.astype(np.int64))


def cache_key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pixels_digest(*arrays: np.ndarray | torch.Tensor) -> str:
    """A digest of exactly the images (and targets) a cached result was computed from: their
    bytes, shapes and dtypes. Keyed by it, a result is never reused for another source, split or
    preprocessing that happens to give the same rows."""
    digest = hashlib.sha256()
    for array in arrays:
        values = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else array)
        digest.update(f"{values.dtype.str}{values.shape}\n".encode())
        digest.update(values.data)
    return digest.hexdigest()[:20]


def cached_attack(
    cache_dir: Path, key_parts: dict[str, object], run: Callable[[], AttackOutput]
) -> tuple[AttackOutput, bool]:
    """Run an attack, or load its adversarials from ``cache_dir`` (keyed by ``key_parts``).
    Returns (output, loaded from cache)."""
    path = cache_dir / f"{key_parts.get('attack', 'attack')}-{cache_key(key_parts)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return AttackOutput(data["adversarial"], float(data["seconds"])), True
    output = run()
    save_npz(
        path,
        adversarial=output.adversarial,
        seconds=np.array(output.seconds),
        key=np.array(json.dumps(key_parts, sort_keys=True, default=str)),
    )
    return output, False


# The attacks whose adversarials ``advguard simulate`` replays as attacking clients.
EXPORTED_ATTACKS: tuple[str, ...] = (
    "fgsm",
    "lbfgs",
    "pgd",
    "cw",
    "fgsm_untargeted",
    "pgd_untargeted",
    "pgd_l2",
    "adaptive",
    "adaptive_v2",
)
# The attacks another model's evaluation judges as transfer sets (crafted without its weights).
TRANSFER_ATTACKS: tuple[str, ...] = tuple(
    a for a in EXPORTED_ATTACKS if not a.startswith("adaptive")
)


def export_path(cache_dir: Path, model_name: str) -> Path:
    return cache_dir / "sets" / f"{model_name}.npz"


def export_attack_sets(
    path: Path,
    selection: Selection,
    adversarial: dict[str, np.ndarray],
    rows: dict[str, np.ndarray],
    source: str,
) -> Path:
    """The successful adversarials of each exported attack as the 8-bit images a client would
    upload (rounded from [0, 1] floats), with the authentic rows of the test split they came from
    and, per attack, which of those authentic images each adversarial was made from.
    """
    arrays: dict[str, np.ndarray] = {
        "authentic_rows": selection.authentic,
        "error_rows": selection.errors,
        "source": np.array(source),
    }
    for name in EXPORTED_ATTACKS:
        if name in adversarial:
            arrays[f"attack_{name}"] = eight_bit(adversarial[name])
            arrays[f"rows_{name}"] = rows[name]
    save_npz(path, compressed=True, **arrays)
    return path


@dataclass(frozen=True)
class AttackSets:
    authentic_rows: np.ndarray
    error_rows: np.ndarray
    attacks: dict[str, np.ndarray]  # attack -> (n, 3, H, W) uint8 adversarial images
    source: str
    # attack -> (n,) positions in authentic_rows each adversarial was made from (newer exports)
    rows: dict[str, np.ndarray] = field(default_factory=dict)


def load_attack_sets(path: Path) -> AttackSets:
    if not path.is_file():
        raise FileNotFoundError(
            f"no exported attack sets at {path}: run `advguard evaluate --bundle <bundle>` first"
        )
    with np.load(path, allow_pickle=False) as data:
        attacks = {
            name.removeprefix("attack_"): data[name]
            for name in data.files
            if name.startswith("attack_")
        }
        rows = {
            name.removeprefix("rows_"): data[name]
            for name in data.files
            if name.startswith("rows_")
        }
        return AttackSets(
            data["authentic_rows"], data["error_rows"], attacks, str(data["source"]), rows
        )
