"""The builder records each index row's source reference (``sources.json``), manifest-hashed;
older bundles without it load unchanged."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from app.core.bundle import load_sources, read_manifest, verify_files
from app.core.errors import BundleError
from app.core.guard import Guard
from app.service.neighbours import NeighbourImages
from index_builder.build import build_bundle
from tests.index_builder.test_build import cifar_config

FORMAT1 = Path(__file__).resolve().parents[1] / "fixtures" / "format1"


def test_directory_build_lists_every_indexed_row(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=10, corrupt=2)
    out = tmp_path / "b"
    manifest = build_bundle(cifar_config(folder, cifar_weights(3), out), progress=False).manifest
    assert manifest.detector.sources_file == "sources.json"
    assert "sources.json" in manifest.files
    references = load_sources(out, manifest)
    assert references is not None and len(references) == manifest.counts.indexed
    labels = np.load(out / "labels.npy")
    classes = sorted(p.name for p in folder.iterdir())
    for reference, label in zip(references, labels, strict=True):
        assert (folder / reference).is_file()
        assert classes.index(reference.split("/")[0]) == label  # row i's label is its folder's
        assert not Path(reference).name.startswith("bad_")  # skipped images are not indexed
    assert len(set(references)) == len(references)


def test_archive_build_lists_members_the_service_can_read(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=10)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="train")
    out = tmp_path / "t"
    build_bundle(cifar_config(archive, cifar_weights(3), out, split="train"), progress=False)
    manifest = read_manifest(out)
    references = load_sources(out, manifest)
    assert references is not None and all(r.startswith("train/") for r in references)
    images = NeighbourImages(archive, references)
    for row in (0, len(references) - 1):
        original = (folder / references[row].removeprefix("train/")).read_bytes()
        assert images.raw(row) == original


def test_sources_file_is_checked_against_the_manifest(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=8)
    out = tmp_path / "b"
    build_bundle(cifar_config(folder, cifar_weights(3), out), progress=False)
    references = json.loads((out / "sources.json").read_text())
    (out / "sources.json").write_text(json.dumps(list(reversed(references))))
    with pytest.raises(BundleError, match=r"sources\.json"):
        verify_files(out, read_manifest(out))


@pytest.mark.parametrize("kind", ["single", "fisher"])
def test_bundles_without_source_references_still_load(kind, tmp_path):
    bundle = tmp_path / kind  # the old builder's fixtures share one model file
    shutil.copytree(FORMAT1 / kind, bundle)
    shutil.copyfile(FORMAT1 / "model.pth", bundle / "model.pth")
    manifest = read_manifest(bundle)
    assert manifest.detector.sources_file is None
    assert load_sources(bundle, manifest) is None
    Guard.load(bundle, device="cpu")  # loads and verifies as before
