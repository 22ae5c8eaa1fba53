"""Image files of a folder (read recursively) or of an archive (.zip, .tar, .tar.gz), listed and read one by one.

A folder's images and a zip archive's members are in sorted order of their relative path; a tar archive's are
in the order it stores them (``tar -tf``), so a compressed tar streams in one pass. Hidden entries (a path part
starting with ``.``, macOS ``__MACOSX`` folders) and files whose name does not end in an image extension are
skipped and counted. Nothing is extracted to disk.
"""

from __future__ import annotations

import functools
import os
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dgmood.data.errors import DataError
from dgmood.data.images import IMAGE_EXTENSIONS, BadImage

__all__ = ["ARCHIVE_SUFFIXES", "MAX_MEMBER_BYTES", "Collection", "archive_kind", "list_collection"]

ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".tar.bz2": "tar",
                    ".tar.xz": "tar"}
"""File name endings read as image archives, and how."""

MAX_MEMBER_BYTES = 256 << 20
"""Largest file or archive member read (bytes); a bigger one is refused as a bad image."""


@dataclass
class Collection:
    """The image files of one folder or archive.

    Attributes:
        path: the folder or archive.
        kind: ``folder``, ``zip`` or ``tar``.
        members: each image's path relative to ``path`` (``/``-separated), in load order; also its ``source``.
        skipped: why entries were left out (``hidden``, ``not an image``) → how many.
        prefix: only members under this relative folder were listed (``""``: all); it is not part of ``members``.
    """

    path: Path
    kind: str
    members: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    prefix: str = ""

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, bytes | BadImage]]:
        """(member, its bytes or the BadImage saying why it cannot be read) for members ``start:stop``, in order."""
        wanted = self.members[start:stop]
        if self.kind == "folder":
            yield from ((m, _read_file(self.path / m, m)) for m in wanted)
        elif self.kind == "zip":
            yield from _read_zip(self.path, self.prefix, wanted)
        else:
            yield from _read_tar(self.path, self.prefix, wanted)


def archive_kind(path: str | os.PathLike) -> str | None:
    """``zip`` or ``tar`` from a file name's ending, else None."""
    low = os.fspath(path).lower()
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES.items() if low.endswith(suffix)), None)


def _classify(relative: str) -> str | None:
    """Why an entry is skipped (``hidden`` / ``not an image``), None for an image."""
    parts = PurePosixPath(relative).parts
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return "hidden"
    return None if relative.lower().endswith(IMAGE_EXTENSIONS) else "not an image"


def _sift(names: list[str], prefix: str) -> tuple[list[str], dict[str, int]]:
    """(image members relative to ``prefix``, skipped counts) of an entry list."""
    images, skipped = [], Counter()
    for name in names:
        if not name.startswith(prefix):
            continue
        relative = name[len(prefix):]
        reason = _classify(relative)
        if reason is None:
            images.append(relative)
        else:
            skipped[reason] += 1
    return images, dict(skipped)


def _folder_names(path: Path) -> list[str]:
    """Every file under ``path``, relative and ``/``-separated (hidden folders are still listed, then skipped)."""
    names = []
    for root, _, files in os.walk(path, followlinks=False):
        rel = Path(root).relative_to(path)
        names += [(rel / f).as_posix() for f in files]
    return names


@functools.lru_cache(maxsize=16)
def _archive_index(path: str, kind: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """:func:`_archive_names`, read once per archive version (a .tar.gz is listed by decompressing it whole:
    ``predict`` checks a set's listing before streaming it, and must not pay that pass twice)."""
    return tuple(_archive_names(Path(path), kind))


def _archive_names(path: Path, kind: str) -> list[str]:
    """Names of the file entries of an archive (zip: in any order; tar: in stored order)."""
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            return [i.filename for i in zf.infolist() if not i.is_dir()]
    with tarfile.open(path, "r:*") as tf:
        return [m.name for m in tf if m.isfile()]


def list_collection(path: str | os.PathLike, prefix: str = "") -> Collection:
    """List the images of a folder or archive.

    Args:
        path: a folder, or a file ending in one of :data:`ARCHIVE_SUFFIXES`.
        prefix: only list members under this relative folder (e.g. ``tiny-imagenet-200/val/images/``).

    Raises:
        DataError: missing, unreadable or corrupt folder/archive, or one without a single image.
    """
    path = Path(path).expanduser()
    kind = "folder" if path.is_dir() else archive_kind(path)
    if kind is None or not path.exists():
        raise DataError(f"{path} does not exist; check the path") if not path.exists() else \
            DataError(f"{path} is neither a folder nor a .zip/.tar/.tar.gz archive; give one of those")
    try:
        if kind == "folder":
            names = _folder_names(path)
        else:
            stat = path.stat()
            names = list(_archive_index(str(path.resolve()), kind, stat.st_mtime_ns, stat.st_size))
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as err:
        raise DataError(f"cannot read {path} ({err}); it is truncated or corrupt, copy or download it again") from None
    members, skipped = _sift(names, prefix)
    if kind != "tar":
        members.sort()
    if not members:
        what = f" ({', '.join(f'{n} {r}' for r, n in skipped.items())} skipped)" if skipped else ""
        where = "folder" if kind == "folder" else "archive"
        raise DataError(f"{where} {path} has no images{what}; put PNG/JPEG files in it "
                        f"(names ending in {', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return Collection(path, kind, members, skipped, prefix)


def _too_big(member: str, size: int) -> BadImage | None:
    return BadImage(member, f"{size:,} bytes is over the {MAX_MEMBER_BYTES:,}-byte limit of one image",
                    kind="too-large") \
        if size > MAX_MEMBER_BYTES else None


def _read_file(path: Path, member: str) -> bytes | BadImage:
    try:
        return _too_big(member, path.stat().st_size) or path.read_bytes()
    except OSError as err:
        return BadImage(member, f"cannot read the file ({err.strerror or err})")


def _read_zip(path: Path, prefix: str, wanted: list[str]) -> Iterator[tuple[str, bytes | BadImage]]:
    with zipfile.ZipFile(path) as zf:
        for member in wanted:
            try:
                info = zf.getinfo(prefix + member)
                yield member, _too_big(member, info.file_size) or zf.read(info)
            except (OSError, EOFError, KeyError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
                    zlib.error) as err:
                yield member, BadImage(member, f"cannot read the archive member ({err})")


def _read_tar(path: Path, prefix: str, wanted: list[str]) -> Iterator[tuple[str, bytes | BadImage]]:
    """Members in stored order: one sequential pass, stopping after the last one wanted."""
    if not wanted:
        return
    todo = set(wanted)
    with tarfile.open(path, "r:*") as tf:
        try:
            for info in tf:
                member = info.name[len(prefix):] if info.name.startswith(prefix) else None
                if member not in todo:
                    continue
                todo.discard(member)
                big = _too_big(member, info.size)
                yield member, big or tf.extractfile(info).read()
                if not todo:
                    return
        except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
            for member in wanted:
                if member in todo:
                    yield member, BadImage(member, f"cannot read the archive member ({err})")
                    todo.discard(member)
