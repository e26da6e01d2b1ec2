"""The demo page's committed examples are what ``python -m evaluation.demo_examples`` makes, and
the demo bundle still decides them as their kind says."""

import json
from pathlib import Path

import pytest

from app.core.guard import Guard
from app.core.images import decode_image
from evaluation.demo_examples import DEFAULT_OUT, main
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((DEFAULT_OUT / "examples.json").read_text())


def test_the_command_regenerates_the_committed_files(committed, tmp_path: Path):
    """Into a folder that already holds a stale example of its own (listed by the last run's
    examples.json) and someone else's PNG: the stale one goes, the other stays."""
    (tmp_path / "mine.png").write_bytes(b"someone else's picture")
    (tmp_path / "pgd-cat-9999.png").write_bytes(b"stale")
    stale = {"examples": [{"file": "pgd-cat-9999.png"}, {"file": "../outside.png"}]}
    (tmp_path / "examples.json").write_text(json.dumps(stale))
    assert main(["--out", str(tmp_path), "--source", str(CIFAR_TAR), "--candidates", "20"]) == 0
    assert (tmp_path / "mine.png").read_bytes() == b"someone else's picture"
    assert not (tmp_path / "pgd-cat-9999.png").exists()
    made = json.loads((tmp_path / "examples.json").read_text())
    assert made["examples"] == committed["examples"]
    assert made["examined"] == committed["examined"]
    for example in committed["examples"]:
        assert (tmp_path / example["file"]).read_bytes() == (
            DEFAULT_OUT / example["file"]
        ).read_bytes(), example["file"]


def test_the_bundle_decides_each_example_as_its_kind_says(committed):
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    examples = committed["examples"]
    assert [e["kind"] for e in examples].count("authentic") == 3
    images = [decode_image((DEFAULT_OUT / e["file"]).read_bytes()) for e in examples]
    for example, verdict in zip(examples, guard.classify_images(images), strict=True):
        correct = verdict.class_name == example["true_class"]
        if example["kind"] == "authentic":
            assert correct and verdict.accepted, example
        else:
            assert not correct and not verdict.accepted, example
