"""A reader of the numeric matrices of MATLAB v5 .mat files (what SVHN publishes), in numpy only: no Python
objects are ever built from the file (no pickles, no cells, structs or MATLAB objects).

Format (MathWorks, "MAT-File Format", level 5): a 128-byte header (116 bytes of text, 8 of subsystem offset, the
version 0x0100 and the endian indicator ``MI``), then data elements, each an 8-byte tag (type, byte count) and its
data padded to 8 bytes (a *small* element packs a type, a count of at most 4 and the data into the 8 bytes). A
variable is a ``miMATRIX`` element, or a ``miCOMPRESSED`` one whose zlib stream holds a ``miMATRIX``; a matrix
holds its array flags (class), dimensions, name and real part, stored column-major, in any numeric type (MATLAB
may store a double matrix of small integers as bytes: the values are cast to the class).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from dgmood.data.errors import DataError

__all__ = ["MAX_VARIABLE_BYTES", "read_mat"]

MAX_VARIABLE_BYTES = 8 << 30
"""Largest variable inflated from a compressed element (bytes); a bigger one is refused as corrupt."""

_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_CLASS_NAMES = {1: "a cell array", 2: "a struct", 3: "a MATLAB object", 4: "a char array", 5: "a sparse matrix",
                16: "a function handle", 17: "an opaque object"}
_COMPLEX = 0x0800


def _error(message: str):
    return DataError(message)


def _endian(head: bytes, path: Path) -> str:
    """``<`` or ``>`` from the 128-byte header, or DataError for a file that is not a MATLAB v5 .mat."""
    if len(head) < 128:
        raise _error(f"{path} is shorter than a .mat header; it is truncated or not a MATLAB file, get it again")
    if head.startswith(b"MATLAB 7.3"):
        raise _error(f"{path} is a MATLAB v7.3 (HDF5) file; save it in MATLAB with -v7 (or -v6) to read it here")
    indicator = head[126:128]
    if not head.startswith(b"MATLAB") or indicator not in (b"IM", b"MI"):
        raise _error(f"{path} is not a MATLAB v5 .mat file (bad header); get the file again")
    return "<" if indicator == b"IM" else ">"


def _element(buf: memoryview, pos: int, order: str, where: str) -> tuple[int, memoryview, int]:
    """(type, data, next position) of the data element at ``pos`` of ``buf`` (small or full, 8-byte padded)."""
    if pos + 8 > len(buf):
        raise _error(f"{where} is truncated (an element tag is cut off); get the file again")
    first, count = struct.unpack_from(order + "II", buf, pos)
    if first >> 16:  # small data element: count in the upper half, data in the tag's second word
        kind, count = first & 0xFFFF, first >> 16
        if count > 4:
            raise _error(f"{where} is corrupt (a small element of {count} bytes); get the file again")
        return kind, buf[pos + 4:pos + 4 + count], pos + 8
    end = pos + 8 + count
    if end > len(buf):
        raise _error(f"{where} is truncated (an element of {count} bytes is cut off); get the file again")
    return first, buf[pos + 8:end], pos + 8 + (count + 7) // 8 * 8


def _numbers(kind: int, data: memoryview, order: str, where: str) -> np.ndarray:
    """The numbers of a numeric element, as a flat array of its storage type."""
    code = _MI_TYPES.get(kind)
    if code is None or len(data) % np.dtype(code).itemsize:
        raise _error(f"{where} has a numeric part of unknown type {kind} or size {len(data)}; the file is corrupt")
    return np.frombuffer(data, np.dtype(order + code))


def _matrix(body: memoryview, order: str, where: str, names: set[str] | None) -> tuple[str, np.ndarray | None]:
    """(name, array) of a ``miMATRIX``'s content; the array is None for a variable not in ``names``.

    The array has the matrix's dimensions, the dtype of its class and column-major (Fortran) order, like
    ``scipy.io.loadmat(..., mat_dtype=True)``.
    """
    kind, flags, pos = _element(body, 0, order, where)
    if kind != 6 or len(flags) != 8:
        raise _error(f"{where} has a matrix without array flags; the file is corrupt, get it again")
    word = _numbers(kind, flags, order, where)[0]
    cls, bits = int(word) & 0xFF, int(word)
    kind, dims, pos = _element(body, pos, order, where)
    shape = tuple(int(d) for d in _numbers(kind, dims, order, where))
    kind, raw_name, pos = _element(body, pos, order, where)
    name = bytes(raw_name).decode("latin-1")
    if names is not None and name not in names:
        return name, None
    if cls not in _CLASSES or bits & _COMPLEX:
        what = "a complex matrix" if cls in _CLASSES else _CLASS_NAMES.get(cls, f"of MATLAB class {cls}")
        raise _error(f"variable '{name}' of {where} is {what}; only real numeric matrices are read, "
                     "save the images and labels as numeric arrays")
    kind, real, pos = _element(body, pos, order, where)
    values = _numbers(kind, real, order, where)
    if any(d < 0 for d in shape) or values.size != math.prod(shape):
        raise _error(f"variable '{name}' of {where} has {values.size} values for dimensions {shape}; "
                     "the file is corrupt, get it again")
    return name, values.astype(np.dtype(_CLASSES[cls]), copy=True).reshape(shape, order="F")


def _inflate(data: bytes, where: str) -> memoryview:
    """The zlib stream of a ``miCOMPRESSED`` element, inflated (at most :data:`MAX_VARIABLE_BYTES`)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_VARIABLE_BYTES)
    except zlib.error as err:
        raise _error(f"{where} has a corrupt compressed variable ({err}); get the file again") from None
    if inflater.unconsumed_tail:
        raise _error(f"{where} has a compressed variable over {MAX_VARIABLE_BYTES:,} bytes; it is corrupt")
    return memoryview(out)


def _variable(kind: int, data: bytes, order: str, where: str, names: set[str] | None
              ) -> tuple[str, np.ndarray | None] | None:
    """(name, array or None) of a top-level element; None for an element that is not a variable."""
    if kind == _MI_COMPRESSED:
        inner = _inflate(data, where)
        kind, body, _ = _element(inner, 0, order, where)
        data = body
    if kind != _MI_MATRIX or len(data) == 0:
        return None
    return _matrix(memoryview(data), order, where, names)


def read_mat(path: str | os.PathLike, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The real numeric matrices of a MATLAB v5 .mat file.

    Args:
        path: the file.
        names: the variables to read (others are skipped unread, whatever their class); None reads all.

    Returns:
        name → array of the matrix's dimensions (e.g. SVHN's ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1)), of the
        dtype of its MATLAB class (double → float64, uint8 → uint8, ...), Fortran order.

    Raises:
        DataError: a missing, truncated or corrupt file, a v4 or v7.3 file, or a wanted variable that is not a
            real numeric matrix (cell, struct, object, char, sparse, complex).
    """
    path = Path(path)
    wanted = None if names is None else set(names)
    found: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            order = _endian(f.read(128), path)
            while tag := f.read(8):
                if len(tag) < 8:
                    raise _error(f"{path} is truncated (a variable's tag is cut off); get the file again")
                kind, count = struct.unpack(order + "II", tag)
                data = f.read(count)
                if len(data) < count:
                    raise _error(f"{path} is truncated (a variable of {count} bytes is cut off); get the file again")
                got = _variable(kind, data, order, str(path), wanted)
                if got is not None and got[1] is not None:
                    found[got[0]] = got[1]
    except FileNotFoundError:
        raise _error(f"{path} does not exist; check the path") from None
    except OSError as err:
        raise _error(f"cannot read {path} ({err.strerror or err}); check that it is a readable file") from None
    return found
