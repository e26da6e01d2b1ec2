import tarfile
from pathlib import Path

import pytest

from app.core.errors import SourceError
from index_builder import sources
from index_builder.sources import open_source
from tests.conftest import CIFAR_TAR


def make_tar(folder: Path, out: Path, mode: str, split: str | None) -> Path:
    with tarfile.open(out, mode) as archive:
        archive.add(folder, arcname=split or ".")
    return out


@pytest.mark.parametrize(
    "mode,name,in_memory_limit",
    [
        ("w", "s.tar", None),
        ("w:gz", "s.tar.gz", None),
        ("w:gz", "s.tar.gz", 0),
        ("w:xz", "s.tar.xz", None),
    ],
)
def test_directory_and_archives_list_the_same_images(
    make_image_folder, tmp_path, monkeypatch, mode, name, in_memory_limit
):
    if in_memory_limit is not None:  # force the streaming path for compressed archives
        monkeypatch.setattr(sources, "MAX_IN_MEMORY_ARCHIVE_BYTES", in_memory_limit)
    folder = make_image_folder(classes=3, per_class=4)
    (folder / "README.txt").write_text("not an image, not a class")
    direct = open_source(folder).listing()
    archive = open_source(make_tar(folder, tmp_path / name, mode, "train"), "train")
    listed = archive.listing()
    assert listed.classes == direct.classes == ["class_00", "class_01", "class_02"]
    assert [e.key for e in listed.entries] == [e.key for e in direct.entries]
    assert archive.streaming == (in_memory_limit == 0)
    entry = next(e for e in listed.entries if e.key.endswith("class_01/0000.jpg"))
    want = (folder / "class_01" / "0000.jpg").read_bytes()
    streamed = dict(archive.stream({entry.member})) if archive.streaming else {}
    got = streamed[entry.member] if archive.streaming else archive.read(entry)
    assert got == want


def test_per_class_limit_and_errors(make_image_folder, tmp_path):
    folder = make_image_folder(classes=2, per_class=5)
    assert len(open_source(folder).listing(per_class_limit=2).entries) == 4
    with pytest.raises(SourceError):
        open_source(tmp_path / "missing")
    with pytest.raises(SourceError, match="no class folders"):
        (tmp_path / "empty").mkdir()
        open_source(tmp_path / "empty").listing()
    with pytest.raises(SourceError, match="no <class>/<image> members under test/"):
        open_source(make_tar(folder, tmp_path / "x.tar", "w", "train"), "test").listing()


def test_shared_cifar_archive_listing():
    listing = open_source(CIFAR_TAR, "test").listing(per_class_limit=3)
    assert listing.classes[0] == "airplane" and listing.classes[-1] == "truck"
    assert len(listing.classes) == 10 and len(listing.entries) == 30
