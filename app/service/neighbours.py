"""Images of the bundle's indexed training rows, read from their source, as small thumbnails.

The builder records each index row's source reference (``sources.json``: an archive member path,
or a path under the source directory). Given the same source (``ADVGUARD_NEIGHBOUR_SOURCE``: the
ImageFolder directory or the .tar/.tar.gz the bundle was built from), the service can show a
trusted caller the nearest training images behind a decision. A directory is read per request; an
archive is scanned once, on first use, keeping only the referenced members' bytes (CIFAR-10's
45,000 indexed JPEGs: ~50 MB), since a compressed tar cannot be read at an offset.
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError

from app.core.errors import AdvguardError

THUMBNAIL_PX = 128  # longest side of a served thumbnail (smaller images are served as they are)


class NeighbourSourceError(AdvguardError):
    """The neighbour source cannot serve the bundle's images (refused at start)."""


class NeighbourNotFoundError(Exception):
    """No image for that row (out of range, or missing from the source)."""


def _member_key(name: str) -> str:
    return str(PurePosixPath(name.removeprefix("./")))


class NeighbourImages:
    def __init__(self, source: Path, references: list[str]) -> None:
        if not source.exists():
            raise NeighbourSourceError(f"neighbour source not found: {source}")
        if not (source.is_dir() or tarfile.is_tarfile(source)):
            raise NeighbourSourceError(f"neighbour source {source} is not a directory or a tar")
        self.source = source
        self.references = references
        self._members: dict[str, bytes] | None = None
        self._lock = threading.Lock()

    def _archive_members(self) -> dict[str, bytes]:
        with self._lock:
            if self._members is None:
                wanted = {_member_key(r) for r in self.references}
                members: dict[str, bytes] = {}
                with tarfile.open(self.source, "r:*") as archive:
                    for member in archive:
                        key = _member_key(member.name)
                        if member.isfile() and key in wanted:
                            handle = archive.extractfile(member)
                            if handle is not None:
                                members[key] = handle.read()
                self._members = members
            return self._members

    def raw(self, row: int) -> bytes:
        """The source file's bytes of index row ``row``."""
        if not 0 <= row < len(self.references):
            raise NeighbourNotFoundError(f"no index row {row}")
        reference = self.references[row]
        if self.source.is_dir():
            root = self.source.resolve()
            path = (root / reference).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                raise NeighbourNotFoundError(f"row {row}: its image is not in the source")
            return path.read_bytes()
        data = self._archive_members().get(_member_key(reference))
        if data is None:
            raise NeighbourNotFoundError(f"row {row}: its image is not in the source")
        return data

    def thumbnail(self, row: int) -> bytes:
        """Index row ``row``'s image as a PNG, its longest side at most ``THUMBNAIL_PX``."""
        try:
            with Image.open(io.BytesIO(self.raw(row))) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:  # its message names a buffer or path
            raise NeighbourNotFoundError(f"row {row}: its image cannot be read") from exc
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
