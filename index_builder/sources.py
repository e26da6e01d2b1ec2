"""Labelled image sources in the ImageFolder layout (one folder per class).

A source is a directory or a .tar / .tar.gz / .tgz archive, optionally with split folders
(``train/``, ``test/``) above the class folders. Archives are read in place, never extracted to
disk: plain tars by seeking to each member, compressed tars by streaming through them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.core.errors import SourceError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)


@dataclass(frozen=True)
class Entry:
    key: str  # "<class>/<file>", the same for a directory and an archive of it
    label: int
    member: str = ""  # member name inside an archive
    offset: int = -1  # data offset inside a plain tar, else -1
    size: int = -1


@dataclass(frozen=True)
class SourceListing:
    classes: list[str]
    entries: list[Entry]


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _class_and_name(relative: PurePosixPath) -> tuple[str, str] | None:
    parts = relative.parts
    if len(parts) != 2 or not _is_image(parts[1]) or parts[1].startswith("."):
        return None
    return parts[0], parts[1]


def _limit(grouped: dict[str, list[Entry]], per_class_limit: int | None) -> list[Entry]:
    entries: list[Entry] = []
    for name in sorted(grouped):
        members = grouped[name]
        entries.extend(members if per_class_limit is None else members[:per_class_limit])
    return entries


class ImageSource:
    """Base class: a listing plus a way to read bytes."""

    description: str

    def listing(self, per_class_limit: int | None = None) -> SourceListing:
        raise NotImplementedError

    @property
    def streaming(self) -> bool:
        """True when members can only be read in archive order (compressed tars)."""
        return False

    def read(self, entry: Entry) -> bytes:
        raise NotImplementedError

    def stream(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(member, bytes) for the wanted archive members, in archive order (streaming only)."""
        raise NotImplementedError


class DirectorySource(ImageSource):
    def __init__(self, root: Path, split: str | None) -> None:
        self.root = root / split if split else root
        if not self.root.is_dir():
            raise SourceError(f"no such directory: {self.root}")
        self.description = str(self.root)

    def listing(self, per_class_limit: int | None = None) -> SourceListing:
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not classes:
            raise SourceError(f"{self.root} holds no class folders")
        grouped: dict[str, list[Entry]] = {}
        for label, name in enumerate(classes):
            files = sorted(
                p.name for p in (self.root / name).iterdir() if p.is_file() and _is_image(p.name)
            )
            grouped[name] = [Entry(f"{name}/{file}", label) for file in files]
        return SourceListing(classes, _limit(grouped, per_class_limit))

    def read(self, entry: Entry) -> bytes:
        return (self.root / entry.key).read_bytes()


class TarSource(ImageSource):
    def __init__(self, path: Path, split: str | None) -> None:
        if not path.is_file():
            raise SourceError(f"no such archive: {path}")
        self.path = path
        self.split = split
        self.compressed = self._is_compressed(path)
        self.description = f"{path}" + (f"::{split}" if split else "")
        self._handle: object | None = None

    @staticmethod
    def _is_compressed(path: Path) -> bool:
        with path.open("rb") as handle:
            magic = handle.read(6)
        return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00"

    @property
    def streaming(self) -> bool:
        return self.compressed

    def _relative(self, name: str) -> PurePosixPath | None:
        path = PurePosixPath(name.removeprefix("./"))
        if self.split:
            if not path.parts or path.parts[0] != self.split:
                return None
            path = PurePosixPath(*path.parts[1:])
        return path

    def listing(self, per_class_limit: int | None = None) -> SourceListing:
        grouped: dict[str, list[Entry]] = {}
        try:
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    relative = self._relative(member.name)
                    found = _class_and_name(relative) if relative else None
                    if found is None:
                        continue
                    grouped.setdefault(found[0], []).append(
                        Entry("/".join(found), -1, member.name, member.offset_data, member.size)
                    )
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SourceError(f"cannot read archive {self.path}: {exc}") from exc
        if not grouped:
            where = f" under {self.split}/" if self.split else ""
            raise SourceError(f"{self.path} holds no <class>/<image> members{where}")
        classes = sorted(grouped)
        labelled = {
            name: [Entry(e.key, label, e.member, e.offset, e.size) for e in grouped[name]]
            for label, name in enumerate(classes)
        }
        return SourceListing(classes, _limit(labelled, per_class_limit))

    def read(self, entry: Entry) -> bytes:
        if self.compressed or entry.offset < 0:
            raise SourceError("compressed archives are read by streaming, not by seeking")
        if self._handle is None:  # one handle per process (each DataLoader worker opens its own)
            self._handle = self.path.open("rb")
        handle = self._handle
        assert hasattr(handle, "seek") and hasattr(handle, "read")
        handle.seek(entry.offset)
        data: bytes = handle.read(entry.size)
        return data

    def stream(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        with tarfile.open(self.path, "r|*") as archive:
            for member in archive:
                if member.isfile() and member.name in wanted:
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        yield member.name, extracted.read()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_handle"] = None  # file handles do not cross into worker processes
        return state


def open_source(path: Path, split: str | None = None) -> ImageSource:
    """A directory or a tar archive, with an optional split folder (``train``, ``val``...)."""
    if path.is_dir():
        return DirectorySource(path, split)
    if path.is_file():
        return TarSource(path, split)
    raise SourceError(f"image source not found: {path}")
