"""The demo page's bundled examples: authentic CIFAR-10 test images the demo bundle accepts and
adversarials made by the evaluation's own attacks that it rejects, as small PNGs.

    python -m evaluation.demo_examples            # writes app/service/static/examples/

Selection rule, fixed in advance (no picking beyond it): walk the CIFAR-10 test images in one
order (image number 0, 1, 2, ..., and within a number the classes in label order: airplane/0000,
automobile/0000, ..., truck/0000, airplane/0001, ...) and keep

- *authentic*: the first ``--authentic`` images whose PNG the bundle classifies correctly and
  accepts;
- per attack (untargeted FGSM and PGD-Linf, eps 8/255, PGD with the evaluation's alpha 2/255 and
  10 steps, seed 0): the first ``--per-attack`` images, among those the model classifies
  correctly, whose adversarial PNG the model misclassifies *and* the bundle rejects.

Every decision is the service's own (``Guard.classify_images`` on the PNG as decoded from the
file written), so the page shows what the service answers. ``examples.json`` records each file,
its source image, the attack, and how many candidates each rule examined.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.cli import at_least
from app.core.guard import Guard
from app.core.images import decode_image
from app.service.settings import DEFAULT_BUNDLE
from evaluation.attacks import LogitsModel, fgsm_untargeted, pgd_untargeted
from evaluation.data import eight_bit

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "app" / "service" / "static" / "examples"
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
EPS = 8 / 255
PGD_ALPHA = 2 / 255
PGD_STEPS = 10
COMMAND = "python -m evaluation.demo_examples"


@dataclass(frozen=True)
class TestImage:
    member: str  # archive member, e.g. test/cat/0000.jpg
    label: int
    pixels: np.ndarray  # (3, H, W) uint8


def ordered_test_images(source: Path, classes: list[str], count: int) -> list[TestImage]:
    """The first ``count`` test images in the rule's order (number, then class label)."""
    per_class = -(-count // len(classes))
    wanted = {f"test/{name}/{i:04d}.jpg" for name in classes for i in range(per_class)}
    found: dict[str, bytes] = {}
    with tarfile.open(source, "r:*") as archive:
        for info in archive:
            name = info.name.removeprefix("./")
            if info.isfile() and name in wanted:
                handle = archive.extractfile(info)
                assert handle is not None
                found[name] = handle.read()
    images = []
    for i in range(per_class):
        for label, name in enumerate(classes):
            member = f"test/{name}/{i:04d}.jpg"
            if member in found:
                rgb = np.asarray(decode_image(found[member]), dtype=np.uint8)
                images.append(TestImage(member, label, rgb.transpose(2, 0, 1).copy()))
    return images[:count]


def png(pixels: np.ndarray) -> bytes:
    """(3, H, W) uint8 -> PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


def verdicts(guard: Guard, files: list[bytes]) -> list[tuple[int, bool]]:
    """(predicted class, accepted) of each PNG, decoded as the service decodes uploads."""
    found = guard.classify_images([decode_image(data) for data in files])
    return [(v.predicted_class, v.accepted) for v in found]


def select(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    guard = Guard.load(args.bundle, device="cpu")
    images = ordered_test_images(args.source, guard.class_names, args.candidates)
    clean = [png(image.pixels) for image in images]
    clean_verdicts = verdicts(guard, clean)
    correct = [i for i, (predicted, _) in enumerate(clean_verdicts) if predicted == images[i].label]
    chosen: list[dict[str, object]] = []
    examined: dict[str, int] = {}
    authentic = [i for i in correct if clean_verdicts[i][1]][: args.authentic]
    examined["authentic"] = (authentic[-1] + 1) if authentic else len(images)
    for i in authentic:
        chosen.append(_entry(images[i], "authentic", clean[i], guard, clean_verdicts[i]))
    model = LogitsModel(guard.network).eval()
    pixels = torch.from_numpy(np.stack([images[i].pixels for i in correct]).astype(np.float32))
    pixels = pixels / 255.0
    labels = torch.tensor([images[i].label for i in correct])
    for kind in ("fgsm", "pgd"):
        made = (
            fgsm_untargeted(model, pixels, labels, EPS)
            if kind == "fgsm"
            else pgd_untargeted(model, pixels, labels, EPS, PGD_ALPHA, PGD_STEPS)
        )
        adversarial = eight_bit(made.adversarial)
        files = [png(a) for a in adversarial]
        found = verdicts(guard, files)
        kept = [
            j
            for j, (predicted, accepted) in enumerate(found)
            if predicted != int(labels[j]) and not accepted
        ][: args.per_attack]
        examined[kind] = (correct[kept[-1]] + 1) if kept else len(images)
        for j in kept:
            chosen.append(_entry(images[correct[j]], kind, files[j], guard, found[j]))
    return {"command": COMMAND, "rule": __doc__, "examined": examined, "examples": chosen}


def _entry(
    image: TestImage, kind: str, data: bytes, guard: Guard, verdict: tuple[int, bool]
) -> dict[str, object]:
    stem = Path(image.member).stem
    name = f"{kind}-{guard.class_names[image.label]}-{stem}.png"
    return {
        "file": name,
        "kind": kind,
        "true_class": guard.class_names[image.label],
        "source": image.member,
        "predicted_class": guard.class_names[verdict[0]],
        "accepted": verdict[1],
        "data": data,
    }


def previous_examples(out: Path) -> list[Path]:
    """The images the last run wrote into ``out``, as its ``examples.json`` lists them: the only
    files this command deletes, so a folder holding anyone else's PNGs keeps them."""
    listing = out / "examples.json"
    if not listing.is_file():
        return []
    try:
        names = [str(example["file"]) for example in json.loads(listing.read_text())["examples"]]
    except (ValueError, KeyError, TypeError):  # not this command's listing: delete nothing
        return []
    return [out / Path(name).name for name in names if name.endswith(".png")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle directory (default: the demo's)"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 JPEG tar with a test/ split (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where the PNGs and examples.json go, old ones replaced (default: the demo page's)",
    )
    parser.add_argument(
        "--authentic",
        type=at_least(0),
        default=3,
        help="authentic images kept (default: %(default)s)",
    )
    parser.add_argument(
        "--per-attack",
        type=at_least(0),
        default=2,
        help="rejected adversarials kept per attack (default: %(default)s)",
    )
    parser.add_argument(
        "--candidates", type=at_least(1), default=100, help="test images walked at most"
    )
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    selected = select(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in previous_examples(args.out):
        old.unlink(missing_ok=True)
    examples = selected["examples"]
    assert isinstance(examples, list)
    for example in examples:
        (args.out / example["file"]).write_bytes(example.pop("data"))
    (args.out / "examples.json").write_text(json.dumps(selected, indent=2) + "\n")
    print(json.dumps({"examples": len(examples), "examined": selected["examined"]}))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.demo_examples"))
