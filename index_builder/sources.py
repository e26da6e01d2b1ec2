"""Labelled image sources in the ImageFolder layout (one folder per class).

A source is a directory or a .tar / .tar.gz / .tgz archive, optionally with split folders
(``train/``, ``test/``) above the class folders. Archives are read in place, never extracted to
disk: plain tars by seeking to each member; compressed tars by decompressing them into memory
once per reading process when they fit (``MAX_IN_MEMORY_ARCHIVE_BYTES``), else by streaming.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.core.errors import SourceError

# A compressed archive up to this uncompressed size is decompressed into memory once per reading
# process (C speed) and its members sliced by offset; Python's tar stream parser costs more per
# member than decoding a small JPEG. Larger archives are streamed.
MAX_IN_MEMORY_ARCHIVE_BYTES = 4 << 30

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


def source_reference(entry: Entry, split: str | None) -> str:
    """Where an image lies in its source, for a bundle's ``sources_file``: the member path inside
    an archive, else the path under the source directory (with the split folder)."""
    if entry.member:
        return entry.member
    return f"{split}/{entry.key}" if split else entry.key


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

    description: str  # the path as given (recorded in the manifest)
    identity: str  # the resolved path: the same source however it was typed

    def content_stamp(self, entries: list[Entry]) -> str:
        """A digest of what the entries' bytes are, cheaply: a resumed build reuses features
        only while it matches (images rewritten under their old names change it)."""
        raise NotImplementedError

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
        self.identity = str(self.root.resolve())

    def listing(self, per_class_limit: int | None = None) -> SourceListing:
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not classes:
            raise SourceError(f"{self.root} holds no class folders")
        grouped: dict[str, list[Entry]] = {}
        for label, name in enumerate(classes):
            files = sorted(
                p.name
                for p in (self.root / name).iterdir()
                if p.is_file() and _class_and_name(PurePosixPath(name, p.name)) is not None
            )
            if not files:  # the classes after it would take the wrong labels (as ImageFolder)
                raise SourceError(f"class folder {self.root / name} holds no images")
            grouped[name] = [Entry(f"{name}/{file}", label) for file in files]
        return SourceListing(classes, _limit(grouped, per_class_limit))

    def content_stamp(self, entries: list[Entry]) -> str:
        digest = hashlib.sha256()
        for entry in entries:
            status = (self.root / entry.key).stat()
            digest.update(f"{entry.key}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        return digest.hexdigest()

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
        self.identity = f"{path.resolve()}" + (f"::{split}" if split else "")
        self._handle: object | None = None
        self._uncompressed_bytes: int | None = None  # known after listing()
        self._blob: bytes | None = None  # decompressed archive, per process
        # member name -> data offset of its last copy (listing() keeps that one; stream() too)
        self._last_copy: dict[str, int] = {}

    @staticmethod
    def _is_compressed(path: Path) -> bool:
        with path.open("rb") as handle:
            magic = handle.read(6)
        return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00"

    @property
    def streaming(self) -> bool:
        """Compressed archives too large (or not yet listed) to decompress into memory."""
        if not self.compressed:
            return False
        size = self._uncompressed_bytes
        return size is None or size > MAX_IN_MEMORY_ARCHIVE_BYTES

    def _decompressed(self) -> bytes:
        if self._blob is None:
            raw = self.path.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                self._blob = gzip.decompress(raw)
            elif raw[:3] == b"BZh":
                self._blob = bz2.decompress(raw)
            else:
                self._blob = lzma.decompress(raw)
        return self._blob

    def _relative(self, name: str) -> PurePosixPath | None:
        path = PurePosixPath(name.removeprefix("./"))
        if self.split:
            if not path.parts or path.parts[0] != self.split:
                return None
            path = PurePosixPath(*path.parts[1:])
        return path

    def listing(self, per_class_limit: int | None = None) -> SourceListing:
        """The archive's ``<class>/<image>`` members, as a directory of it would list them:
        each class's images sorted by name, and of a name stored twice (``tar -r``) the last
        copy, the one extraction keeps; a class folder stored without images is refused."""
        found_members: dict[str, Entry] = {}  # key -> its last member
        folders: set[str] = set()
        end = 0
        try:
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    relative = self._relative(member.name)
                    if member.isdir() and relative is not None and len(relative.parts) == 1:
                        folders.add(relative.parts[0])
                    if not member.isfile():
                        continue
                    end = max(end, member.offset_data + member.size)
                    found = _class_and_name(relative) if relative else None
                    if found is None:
                        continue
                    key = "/".join(found)
                    found_members.pop(key, None)  # a later copy replaces it
                    found_members[key] = Entry(
                        key, -1, member.name, member.offset_data, member.size
                    )
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SourceError(f"cannot read archive {self.path}: {exc}") from exc
        self._uncompressed_bytes = end
        self._last_copy = {e.member: e.offset for e in found_members.values()}
        if not found_members:
            where = f" under {self.split}/" if self.split else ""
            raise SourceError(f"{self.path} holds no <class>/<image> members{where}")
        grouped: dict[str, list[Entry]] = {}
        for key in sorted(found_members):
            grouped.setdefault(key.split("/", 1)[0], []).append(found_members[key])
        empty = sorted(folders - set(grouped))
        if empty:  # the classes after it would take the wrong labels (as ImageFolder)
            raise SourceError(f"class folder {empty[0]} in {self.path} holds no images")
        classes = sorted(grouped)
        labelled = {
            name: [Entry(e.key, label, e.member, e.offset, e.size) for e in grouped[name]]
            for label, name in enumerate(classes)
        }
        return SourceListing(classes, _limit(labelled, per_class_limit))

    def content_stamp(self, entries: list[Entry]) -> str:
        status = self.path.stat()  # an archive written again is another source
        digest = hashlib.sha256(f"{status.st_size}\0{status.st_mtime_ns}\n".encode())
        for entry in entries:
            digest.update(f"{entry.member}\0{entry.offset}\0{entry.size}\n".encode())
        return digest.hexdigest()

    def read(self, entry: Entry) -> bytes:
        if entry.offset < 0 or self.streaming:
            raise SourceError("this archive is read by streaming, not by offset")
        if self.compressed:
            return self._decompressed()[entry.offset : entry.offset + entry.size]
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
                last = self._last_copy.get(member.name, member.offset_data)
                if member.isfile() and member.name in wanted and member.offset_data == last:
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        yield member.name, extracted.read()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_handle"] = None  # file handles do not cross into worker processes
        state["_blob"] = None  # each process decompresses its own copy
        return state


def open_source(path: Path, split: str | None = None) -> ImageSource:
    """A directory or a tar archive, with an optional split folder (``train``, ``val``...)."""
    if path.is_dir():
        return DirectorySource(path, split)
    if path.is_file():
        return TarSource(path, split)
    raise SourceError(f"image source not found: {path}")
