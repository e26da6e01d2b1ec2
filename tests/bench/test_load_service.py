"""``bench.load_service``'s CIFAR-10 uploads: a split's JPEGs read from the archive's layout."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from bench.load_service import test_jpegs as cifar_jpegs


def test_a_split_reads_only_its_own_members_in_order(tmp_path: Path) -> None:
    archive = tmp_path / "small.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("test/cat/0.jpg", "train/cat/0.jpg", "train/dog/1.jpg", "test/dog/1.jpg"):
            data = name.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert cifar_jpegs(10, archive) == [b"test/cat/0.jpg", b"test/dog/1.jpg"]
    assert cifar_jpegs(10, archive, split="train") == [b"train/cat/0.jpg", b"train/dog/1.jpg"]
    assert cifar_jpegs(1, archive, split="train") == [b"train/cat/0.jpg"]
