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


@pytest.mark.parametrize("in_memory_limit", [None, 0])
def test_an_archive_lists_like_a_directory_whatever_its_member_order_and_copies(
    make_image_folder, tmp_path, monkeypatch, in_memory_limit
):
    """Members stored out of order take the per-class limit by name, as a directory does; a
    name stored twice (tar -r) is its last copy, read or streamed, as extraction keeps."""
    if in_memory_limit is not None:
        monkeypatch.setattr(sources, "MAX_IN_MEMORY_ARCHIVE_BYTES", in_memory_limit)
    folder = make_image_folder(classes=2, per_class=4)
    names = {c: sorted(p.name for p in (folder / c).iterdir()) for c in ("class_00", "class_01")}
    (folder / "class_00" / "._0000.jpg").write_bytes(b"AppleDouble")  # skipped by both
    path = tmp_path / "s.tar.gz"
    newer = tmp_path / "newer"
    newer.write_bytes((folder / "class_01" / names["class_01"][3]).read_bytes())
    with tarfile.open(path, "w:gz") as archive:
        for name in [*reversed(names["class_00"]), "._0000.jpg"]:
            archive.add(folder / "class_00" / name, arcname=f"class_00/{name}")
        for name in names["class_01"]:
            archive.add(folder / "class_01" / name, arcname=f"class_01/{name}")
        second_name = f"class_00/{names['class_00'][1]}"
        archive.add(newer, arcname=second_name)  # a second copy of that name, appended
    direct = open_source(folder).listing(per_class_limit=2)
    listed = open_source(path).listing(per_class_limit=2)
    assert [e.key for e in listed.entries] == [e.key for e in direct.entries]
    assert [e.key for e in listed.entries][:2] == [f"class_00/{n}" for n in names["class_00"][:2]]
    archive = open_source(path)
    entries = archive.listing().entries
    assert len(entries) == 8
    second = next(e for e in entries if e.key == second_name)
    if archive.streaming:
        streamed = list(archive.stream({e.member for e in entries}))
        assert len(streamed) == 8  # each name once: the last copy
        got = dict(streamed)[second.member]
    else:
        got = archive.read(second)
    assert got == newer.read_bytes()


def test_a_class_folder_without_images_is_refused(make_image_folder, tmp_path):
    """Every class after it would take the next label: the model's classes would be shifted."""
    folder = make_image_folder(classes=3, per_class=2)
    for path in (folder / "class_01").iterdir():
        path.unlink()
    with pytest.raises(SourceError, match="class_01 holds no images"):
        open_source(folder).listing()
    archive = make_tar(folder, tmp_path / "s.tar", "w", None)
    with pytest.raises(SourceError, match=r"class_01 in .* holds no images"):
        open_source(archive).listing()


def test_the_content_stamp_sees_rewritten_images_and_the_identity_ignores_spelling(
    make_image_folder, tmp_path, monkeypatch
):
    folder = make_image_folder(classes=2, per_class=3)
    source = open_source(folder)
    entries = source.listing().entries
    before = source.content_stamp(entries)
    assert source.content_stamp(entries) == before
    image = folder / entries[0].key
    image.write_bytes(image.read_bytes() + b"\0")  # same name, other bytes
    assert source.content_stamp(entries) != before
    monkeypatch.chdir(folder.parent)
    assert open_source(Path(folder.name)).identity == open_source(folder.resolve()).identity
    archive = make_tar(folder, tmp_path / "s.tar", "w", None)
    stamp = open_source(archive).content_stamp(open_source(archive).listing().entries)
    make_tar(folder, archive, "w", None)  # written again
    assert open_source(archive).content_stamp(open_source(archive).listing().entries) != stamp
