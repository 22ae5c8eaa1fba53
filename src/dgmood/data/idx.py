"""IDX files (the format of the official MNIST and FashionMNIST releases), gzipped or not: read and written."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from dgmood.data.errors import DataError

__all__ = ["read_idx", "write_idx"]

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; check the path") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); check that it is a readable file") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({e}); download or copy it again") from None


def _idx_header(buf: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, data offset) from an IDX header, validated against the buffer size."""
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); give an IDX *-ubyte[.gz] file")
    dtype, ndim = _IDX_DTYPES.get(buf[2]), buf[3]
    if dtype is None:
        raise DataError(f"{path} has unknown IDX type code 0x{buf[2]:02x}; the file is corrupt, get it again")
    offset = 4 + 4 * ndim
    if ndim == 0 or len(buf) < offset:
        raise DataError(f"{path} has a truncated or corrupt IDX header; download or copy it again")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", ndim, 4))
    expected = offset + math.prod(dims) * dtype.itemsize  # Python ints: no int64 wrap-around
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"{path} is {what}: its header says {dims} = {expected} bytes but it has {len(buf)}; "
            "download or copy it again"
        )
    return dtype, dims, offset


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    Args:
        path: the file; gzip is detected from its content.

    Returns:
        A writable array in native byte order with the header's dims, e.g. (N, H, W) uint8 for images,
        (N,) uint8 for labels.

    Raises:
        DataError: missing, unreadable, truncated or corrupt file (the message names it).
    """
    path = Path(path)
    buf = _read_bytes(path)
    dtype, dims, offset = _idx_header(buf, path)
    try:
        arr = np.frombuffer(buf, dtype, offset=offset).reshape(dims)
    except ValueError as e:  # an empty array whose other dims are too big for numpy
        raise DataError(f"{path} has impossible IDX dims {dims} ({e}); the file is corrupt, get it again") from None
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an array as an IDX file, gzipped when the name ends in ``.gz``.

    Args:
        path: destination.
        array: uint8, int8, int16, int32, float32 or float64 array with at least one dim.

    Returns:
        The path written.
    """
    path, array = Path(path), np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0:
        raise DataError(
            f"cannot write {array.dtype} array of ndim {array.ndim} as IDX; use uint8 or float32 with ndim >= 1"
        )
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + np.ascontiguousarray(array, _IDX_DTYPES[code]).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=6) if path.name.endswith(".gz") else data)
    return path
