"""Crash-safe file writes and checksums (no torch import, so reporting stays light)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "canonical_sha256", "checksum_matches", "file_sha256", "remove_leftovers", "user_cache_dir",
           "with_checksum", "write_json"]

# When this module was imported: every file this process writes through atomic_write is newer.
PROCESS_START = time.time()
# atomic_write's temporaries: ".<target>.<pid>.<8 random chars>.tmp"; before PIDs were added ".<target>.<8>.tmp"
_OUR_TEMP = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp$")
# safetensors' save_file writes ".tmp" + 6 random chars beside its target, then renames it
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/dgmood/NAME`` (``~/.cache/dgmood/NAME`` when XDG_CACHE_HOME is unset or relative); not
    created."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "dgmood" / name


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one, plus at most the temporary
    ``.<name>.<pid>.<random>.tmp``, which :func:`remove_leftovers` clears later. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: Path, obj) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_leftover(path: Path, extra: re.Pattern | None = None) -> bool:
    """Whether ``path`` is a temporary of a killed write that is safe to delete.

    The rule: its name is one of our temporaries (atomic_write's ``.<name>.<pid>.<random>.tmp``,
    safetensors' ``.tmpXXXXXX``, or one matching ``extra``), it was last modified before this process
    started (so it is none of this process's in-flight writes), and when the name holds a PID, no
    other process with that PID is alive here (so no live writer is still filling it). Only a writer
    on another machine sharing the folder, idle since before this process started, escapes the rule.
    """
    name = Path(path).name
    temp = _OUR_TEMP.match(name)
    if not (temp or _SAFETENSORS_TEMP.match(name) or (extra is not None and extra.match(name))):
        return False
    try:
        if os.stat(path).st_mtime >= PROCESS_START:
            return False
    except FileNotFoundError:
        return False
    pid = temp.group("pid") if temp else None  # our own PID on an older file: an earlier process had it
    return pid is None or int(pid) == os.getpid() or not _pid_alive(int(pid))


def remove_leftovers(directory: Path, extra: re.Pattern | None = None) -> list[str]:
    """Delete the temporaries of killed writes in ``directory`` (see :func:`is_leftover`).

    Arguments:
        extra: Regular expression of further file names the caller owns (e.g. staged checkpoint files).

    Returns:
        The names deleted.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        path = Path(directory) / name
        if name.startswith(".") and is_leftover(path, extra):
            try:
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


def canonical_sha256(obj) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj`` (as it reads back from JSON: sorted keys, no spaces)."""
    canonical = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def with_checksum(obj: dict, key: str, exclude: tuple[str, ...] = ()) -> dict:
    """``obj`` plus ``key``: the :func:`canonical_sha256` of the rest of ``obj`` (less the ``exclude`` keys)."""
    rest = {k: v for k, v in obj.items() if k != key and k not in exclude}
    return {**obj, key: canonical_sha256(rest)}


def checksum_matches(obj, key: str, exclude: tuple[str, ...] = ()) -> bool | None:
    """Whether ``obj[key]`` is the checksum :func:`with_checksum` wrote; None when ``obj`` has none
    (a file from before checksums, or not a JSON object)."""
    if not isinstance(obj, dict) or key not in obj:
        return None
    rest = {k: v for k, v in obj.items() if k != key and k not in exclude}
    return obj[key] == canonical_sha256(rest)
