"""Untrusted files: every loader fed random bytes, truncated or damaged valid files and random shapes.

Each outcome must be the loader's documented clean error (``DataError``, ``CheckpointError``, the
feature cache's ``ValueError`` saying to delete the file) or a correct result; nothing is ever
unpickled. Property tests use hypothesis; files that are small enough are also truncated at every length.
"""

from __future__ import annotations

import ast
import copy
import gzip
import io
import json
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from safetensors.numpy import load_file as st_load_np
from safetensors.numpy import save_file as st_save_np

from dgmood.models.checkpoint import META, STATE, WEIGHTS, CheckpointError, load_checkpoint, load_model
from dgmood.data.datasets import DataError, load_images, read_idx, write_idx
from dgmood.detectors.estimators import GMMDetector, KNNDetector
from dgmood.statistics.score_norms import FeatureCache, FeatureSet
from dgmood.utils.files import file_sha256
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.detectors.persist import load_detector, save_detector
from dgmood.models.train import TrainConfig, train

SRC = Path(__file__).resolve().parents[1] / "src" / "dgmood"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=100)


# ----------------------------------------------------------------------------- helpers


@st.composite
def damaged(draw, good: bytes, flips: bool = True, tails: bool = True, max_random: int = 600) -> bytes:
    """``good`` replaced by random bytes, truncated, given a random tail, or with one bit flipped."""
    kinds = ["random", "truncate", "truncate"] + (["tail"] if tails else []) + (["flip"] if flips else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        return draw(st.binary(max_size=max_random))
    k = draw(st.integers(0, len(good) - 1))
    if kind == "truncate":
        return good[:k]
    if kind == "tail":
        return good[:k] + draw(st.binary(min_size=1, max_size=64))
    bit = draw(st.integers(0, 7))
    return good[:k] + bytes([good[k] ^ (1 << bit)]) + good[k + 1:]


def _outcome(fn, error: type[Exception]):
    """('ok', result) or ('error', exc); any exception other than ``error`` fails the test."""
    try:
        return "ok", fn()
    except error as exc:
        return "error", exc
    except BaseException as exc:  # pragma: no cover - reported as the test failure
        raise AssertionError(f"raw {type(exc).__name__} instead of {error.__name__}: {exc}") from exc


def _data_outcome(fn):
    kind, value = _outcome(fn, DataError)
    if kind == "error":
        assert "\n" not in str(value), f"DataError message is not one line: {value!r}"
    return kind, value


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("untrusted")


_TRIPPED: list[str] = []


def _trip():
    """Called only if a pickle made by :class:`_Canary` is ever unpickled."""
    _TRIPPED.append("unpickled")
    return "tripped"


class _Canary:
    def __reduce__(self):
        return (_trip, ())


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail loudly if anything calls the pickle loaders while the test runs."""
    def refuse(*args, **kwargs):
        _TRIPPED.append("pickle.load called")
        raise AssertionError("pickle loader called")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    _TRIPPED.clear()
    yield
    assert not _TRIPPED, _TRIPPED


# ----------------------------------------------------------------------------- IDX

_IDX_CODES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _ref_idx(raw: bytes) -> np.ndarray | None:
    """Independent IDX parser: the array, or None when the bytes are not a complete valid IDX file."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except Exception:
            return None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_CODES or raw[3] == 0:
        return None
    ndim, dtype = raw[3], np.dtype(_IDX_CODES[raw[2]])
    if len(raw) < 4 + 4 * ndim:
        return None
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = 1
    for d in dims:
        size *= d
    if len(raw) != 4 + 4 * ndim + size * dtype.itemsize:
        return None
    try:
        return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)
    except ValueError:  # empty, but the other dims exceed what numpy can index: not a representable array
        return None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype (up to byte order) and bytes-level values (NaN-safe)."""
    return (a.shape == b.shape and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
            and np.array_equal(a.astype(a.dtype.newbyteorder("=")), b.astype(b.dtype.newbyteorder("=")),
                               equal_nan=a.dtype.kind == "f"))


def _check_idx(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    kind, value = _data_outcome(lambda: read_idx(path))
    expected = _ref_idx(raw)
    if expected is None:
        assert kind == "error", f"read_idx accepted an invalid IDX file: {value!r}"
    else:
        assert kind == "ok", f"read_idx refused a valid IDX file: {value}"
        assert _same(value, expected) and value.dtype.isnative and value.flags.writeable


@FUZZ
@given(raw=st.binary(max_size=300),
       header=st.sampled_from([b"", b"\x00\x00", b"\x00\x00\x08\x01", b"\x00\x00\x0d\x02", b"\x00\x00\x08\x03"]),
       gz=st.booleans())
@example(raw=(65536).to_bytes(4, "big") * 4, header=b"\x00\x00\x08\x04", gz=False)  # dims product wraps int64 to 0
@example(raw=(2 ** 32 - 1).to_bytes(4, "big") * 3, header=b"\x00\x00\x08\x03", gz=True)
@example(raw=bytes(4) + (2 ** 32 - 1).to_bytes(4, "big") * 2, header=b"\x00\x00\x08\x03", gz=False)  # 0 x huge
def test_read_idx_random_bytes(work, raw, header, gz):
    data = header + raw
    _check_idx(work / "random-ubyte", gzip.compress(data) if gz else data)


_IDX_DTYPES = ["u1", "i1", ">i2", ">i4", ">f4", ">f8", "<i2", "<f4", "<f8"]


@FUZZ
@given(arr=hnp.arrays(st.sampled_from(_IDX_DTYPES), hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)),
       gz=st.booleans(), data=st.data())
def test_read_idx_round_trip_and_damage(work, arr, gz, data):
    path = work / ("x-ubyte.gz" if gz else "x-ubyte")
    write_idx(path, arr)
    kind, value = _data_outcome(lambda: read_idx(path))
    assert kind == "ok" and _same(value, arr)
    good = path.read_bytes()
    _check_idx(path, data.draw(damaged(good)))
    if gz:  # a complete gzip stream around a truncated IDX payload
        payload = gzip.decompress(good)
        _check_idx(path, gzip.compress(payload[: data.draw(st.integers(0, len(payload) - 1))]))


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_at_every_length(work, gz):
    path = work / "every-ubyte"
    write_idx(path, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    raw = path.read_bytes()
    if gz:
        raw = gzip.compress(raw)
    for k in range(len(raw)):
        path.write_bytes(raw[:k])
        with pytest.raises(DataError):
            read_idx(path)


# ----------------------------------------------------------------------------- npy / npz images


def _expected_images(arr: np.ndarray) -> np.ndarray | None:
    """What load_images must return for a stored array (None: it must refuse with DataError)."""
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        return None
    if arr.ndim == 3:
        x = arr[:, None]
    elif arr.ndim == 4 and arr.shape[3] in (1, 3):
        x = arr.transpose(0, 3, 1, 2)
    else:
        return None
    if 0 in x.shape:
        return None
    if arr.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        return None
    return x.astype(np.float32)


def _check_images(spec: str, expected: np.ndarray | None) -> None:
    kind, value = _data_outcome(lambda: load_images(spec))
    if expected is None:
        assert kind == "error", f"load_images accepted {spec}: {getattr(value, 'shape', value)}"
        return
    assert kind == "ok", f"load_images refused a valid {spec}: {value}"
    assert value.dtype == np.float32 and value.flags.c_contiguous and value.shape == expected.shape
    assert value.min() >= 0 and value.max() <= 1
    np.testing.assert_array_equal(value, expected)


_SHAPES = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 4)),
    st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 4), st.sampled_from([1, 3, 2, 4, 0])),
    hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=3),
)
_UNIT = st.floats(0, 1)
_ODD = st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 1.5, -0.0, 1.0, 1e-45])


@st.composite
def image_arrays(draw) -> np.ndarray:
    """Arrays of random shape and dtype, valid image sets often enough."""
    shape = draw(_SHAPES)
    dtype = np.dtype(draw(st.sampled_from(
        ["u1", "u1", "f4", "f8", "f2", ">f4", ">f8", "g", "i1", "<u2", "i8", "?", "c8", "U2", "M8[s]"])))
    if dtype.kind == "f":
        width = min(64, 8 * dtype.itemsize)
        elements = _UNIT.map(float) | _ODD if draw(st.booleans()) else st.floats(0, 1, width=width)
        if width < 64:
            elements = elements.filter(lambda v: np.isnan(v) or abs(v) in (0, np.inf) or abs(v) >= 6.2e-5)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    if dtype.kind == "M":
        return np.zeros(shape, dtype)
    return draw(hnp.arrays(dtype, shape))


@FUZZ
@given(arr=image_arrays(), data=st.data())
def test_load_npy_random_shapes_and_damage(work, arr, data):
    path = work / "x.npy"
    np.save(path, arr, allow_pickle=False)
    _check_images(str(path), _expected_images(arr))
    good = path.read_bytes()
    bad = data.draw(damaged(good, flips=False))
    path.write_bytes(bad)
    if bad != good:
        _data_outcome(lambda: load_images(str(path)))  # any clean outcome; a valid file needs a valid header + data
        try:
            stored = np.load(io.BytesIO(bad), allow_pickle=False)
        except Exception:
            stored = None
        if isinstance(stored, np.ndarray):
            _check_images(str(path), _expected_images(stored))
        else:
            _check_images(str(path), None)


@FUZZ
@given(raw=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00",
                                                          b"PK\x03\x04", b"PK\x05\x06"]),
       suffix=st.sampled_from([".npy", ".npz"]))
@example(raw=b"", prefix=b"", suffix=".npy")
def test_load_arrays_random_bytes(work, raw, prefix, suffix):
    path = work / f"r{suffix}"
    path.write_bytes(prefix + raw)
    _check_images(str(path), None)


def test_npy_huge_header_shape_is_refused(work):
    from numpy.lib import format as npformat

    for shape, descr in [((1 << 40,), "|u1"), ((1 << 62, 4), "|u1"), ((1 << 20, 1 << 20, 1 << 10), "<f8")]:
        buf = io.BytesIO()
        npformat.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
        (work / "huge.npy").write_bytes(buf.getvalue() + b"\x00" * 16)
        _check_images(str(work / "huge.npy"), None)


def _npy_with_header(header: str, data: bytes = b"") -> bytes:
    text = header + " " * ((-(len(header) + 11)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1") + data


@pytest.mark.parametrize("header", [
    "{",  # numpy's Python-2 header filter lets tokenize.TokenError escape
    "{'descr': '|u1',\n  'shape': (1,",
    "  {'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2), }\n 1",  # IndentationError from tokenize
    "[1, 2]", "{'descr': '|u1'}", "{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 2, 2), }",
    "{'descr': 'zz', 'fortran_order': False, 'shape': (1, 2, 2), }",
    "{'descr': '|u1', 'fortran_order': 0, 'shape': (1, 2, 2), }",
    "{'descr': [('a', '|u1', (1 << 62,))], 'fortran_order': False, 'shape': (1, 2, 2), }",
    "{'descr': '|O', 'fortran_order': False, 'shape': (1, 2, 2), }",
])
def test_npy_unparseable_headers(work, header):
    (work / "hdr.npy").write_bytes(_npy_with_header(header, b"\x00" * 4))
    _check_images(str(work / "hdr.npy"), None)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", _npy_with_header(header, b"\x00" * 4))
    (work / "hdr.npz").write_bytes(buf.getvalue())
    _check_images(str(work / "hdr.npz"), None)


def test_npy_python2_header_still_loads(work):
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1L, 2L, 2L), }"
    (work / "py2.npy").write_bytes(_npy_with_header(header, bytes([0, 51, 102, 255])))
    with pytest.warns(UserWarning, match="Python 2"):
        _check_images(str(work / "py2.npy"), np.array([0, 51, 102, 255], np.float32).reshape(1, 1, 2, 2) / 255)


def test_npy_truncated_at_every_length(work):
    path = work / "every.npy"
    np.save(path, np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4))
    raw = path.read_bytes()
    for k in range(len(raw)):
        path.write_bytes(raw[:k])
        _check_images(str(path), None)


@FUZZ
@given(arrays=st.dictionaries(st.sampled_from(["x", "train", "test", "a.b"]), image_arrays(), min_size=0, max_size=3),
       compressed=st.booleans(), pick=st.booleans(), data=st.data())
def test_load_npz_random_shapes_and_damage(work, arrays, compressed, pick, data):
    path = work / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    key = data.draw(st.sampled_from(sorted(arrays) + ["missing"])) if pick else None
    spec = str(path) if key is None else f"{path}:{key}"
    if key is None:
        expected = _expected_images(next(iter(arrays.values()))) if len(arrays) == 1 else None
    else:
        expected = _expected_images(arrays[key]) if key in arrays else None
    _check_images(spec, expected)
    good = path.read_bytes()
    bad = data.draw(damaged(good))
    path.write_bytes(bad)
    _data_outcome(lambda: load_images(spec))
    # if the damaged archive still loads, it must give exactly what an independent read of it gives
    try:
        with np.load(io.BytesIO(bad), allow_pickle=False) as z:
            names = list(z.files)
            name = key if key is not None else (names[0] if len(names) == 1 else None)
            stored = z[name] if name in names else None
    except Exception:
        stored = None
    _check_images(spec, _expected_images(stored) if isinstance(stored, np.ndarray) else None)


def test_npz_truncated_at_every_length(work):
    path = work / "every.npz"
    np.savez_compressed(path, x=np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4))
    raw = path.read_bytes()
    for k in range(len(raw)):
        path.write_bytes(raw[:k])
        _check_images(str(path), None)


@FUZZ
@given(member=st.binary(max_size=200), name=st.sampled_from(["x", "x.npy", "x.txt"]),
       method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
@example(member=b"hello", name="x", method=zipfile.ZIP_STORED)
@example(member=b"\x93NUMPY\x01\x00", name="x.npy", method=zipfile.ZIP_DEFLATED)
def test_npz_with_foreign_members(work, member, name, method):
    """Zip archives whose member is not a numpy array (np.load hands such members back as raw bytes)."""
    path = work / "foreign.npz"
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr(name, member)
    key = name[:-4] if name.endswith(".npy") else name
    _check_images(str(path), None)
    _check_images(f"{path}:{key}", None)


def test_zip_with_unsupported_compression_or_encryption(work):
    path = work / "odd.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 2, 2), np.uint8))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", buf.getvalue())
    raw = bytearray(path.read_bytes())
    # compression method 99 (AES) in both the local and the central header
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = raw.index(sig)
        raw[i + off: i + off + 2] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    _check_images(str(path), None)
    # encrypted-flag bit in both headers
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", buf.getvalue())
    raw = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.index(sig)
        raw[i + off] |= 1
    path.write_bytes(bytes(raw))
    _check_images(str(path), None)


@pytest.mark.parametrize("container", ["npy", "npz", "npz-key"])
def test_object_arrays_are_refused_never_unpickled(work, no_unpickling, container):
    objects = np.empty(2, dtype=object)
    objects[:] = [_Canary(), _Canary()]
    good = np.zeros((2, 4, 4), np.uint8)
    if container == "npy":
        path = work / "obj.npy"
        np.save(path, objects, allow_pickle=True)
        spec = str(path)
    else:
        path = work / "obj.npz"
        np.savez(path, x=objects, **({"y": good} if container == "npz-key" else {}))
        spec = f"{path}:x" if container == "npz-key" else str(path)
    with pytest.raises(DataError):
        load_images(spec)
    if container == "npz-key":  # the plain array beside it still loads
        np.testing.assert_array_equal(load_images(f"{path}:y"), good[:, None].astype(np.float32) / 255)


# ----------------------------------------------------------------------------- PNG folders


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@FEW
@given(n=st.integers(1, 3), rgb=st.booleans(), side=st.integers(1, 6), victim=st.integers(0, 2),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_png_folder_with_a_corrupt_file(work, n, rgb, side, victim, seed, data):
    folder = Path(tempfile.mkdtemp(dir=work))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 3) if rgb else (n, side, side), dtype=np.uint8)
    files = []
    for i, im in enumerate(images):
        files.append(folder / f"{i}.png")
        files[-1].write_bytes(_png_bytes(im))
    expected = images.astype(np.float32) / np.float32(255)
    expected = expected.transpose(0, 3, 1, 2) if rgb else expected[:, None]
    _check_images(str(folder), expected)
    target = files[victim % n]
    good = target.read_bytes()
    # random bytes or a truncation (not edits: PIL does not check the CRC of a PNG's image data, and JPEG has
    # none, so an edited image can decode to other pixels, as any valid image would)
    bad = data.draw(damaged(good, flips=False, tails=False))
    target.write_bytes(bad)
    # a damaged file either fails cleanly or (e.g. only the IEND chunk cut off) still decodes to the same pixels
    kind, value = _data_outcome(lambda: load_images(str(folder)))
    if kind == "ok":
        np.testing.assert_array_equal(value, expected)
    shutil.rmtree(folder)


_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff",
          b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
          b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P5\n", b"\x00\x00\x01\x00",
          b"icns", b"8BPS", b"DDS ", b"\x0a\x05\x01\x08"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt metadata it skips
@FUZZ
@given(magic=st.sampled_from(_MAGIC), raw=st.binary(max_size=300), name=st.sampled_from(["a.png", "b.jpg"]))
def test_image_file_random_bytes_after_a_format_magic(work, magic, raw, name):
    """PIL picks the decoder from the content, so any of its formats can sit behind a .png/.jpg name."""
    folder = work / "magic"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / name).write_bytes(magic + raw)
    kind, value = _data_outcome(lambda: load_images(str(folder)))
    if kind == "ok":  # random bytes that PIL decodes: fine, as long as it is a proper image set
        assert value.dtype == np.float32 and value.ndim == 4 and value.shape[1] in (1, 3)
        assert value.min() >= 0 and value.max() <= 1


def test_png_truncated_at_every_length(work):
    folder = work / "png-every"
    folder.mkdir()
    good = _png_bytes(np.arange(36, dtype=np.uint8).reshape(6, 6))
    for k in range(len(good)):
        (folder / "a.png").write_bytes(good[:k])
        kind, value = _data_outcome(lambda: load_images(str(folder)))
        if kind == "ok":
            np.testing.assert_array_equal(value[0, 0], np.arange(36, dtype=np.float32).reshape(6, 6) / 255)


# ----------------------------------------------------------------------------- checkpoints

NET = NetConfig(image_shape=(1, 8, 8), channels=(8, 16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real tiny checkpoint and the state it holds."""
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    images = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    train(images, directory, NET, TrainConfig(steps=2, batch_size=4, warmup=1, checkpoint_every=2), progress=False)
    model, meta = load_model(directory)
    restored = _fresh_training_state()
    load_checkpoint(directory, *restored)
    return directory, {k: v.clone() for k, v in model.state_dict().items()}, meta, _snapshot(*restored)


def _fresh_training_state():
    torch.manual_seed(1)
    model = ScoreNet(NET)
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, ema, torch.optim.Adam(model.parameters(), lr=1e-3), torch.Generator().manual_seed(5)


def _snapshot(model, ema, optimizer, generator) -> dict:
    flat = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    flat.update({f"ema.{k}": v.clone() for k, v in ema.state_dict().items()})
    for idx, entry in optimizer.state_dict()["state"].items():
        flat.update({f"optim.{idx}.{k}": v.clone() for k, v in entry.items()})
    flat["rng"] = generator.get_state().clone()
    return flat


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _copy_checkpoint(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="ck-")) / "checkpoint"
    shutil.copytree(src, dst)
    return dst


def _check_checkpoint(directory: Path, weights: dict, state: dict) -> None:
    """load_model and load_checkpoint each raise CheckpointError or restore exactly the saved state."""
    kind, value = _outcome(lambda: load_model(directory), CheckpointError)
    if kind == "ok":
        assert _equal_states(value[0].state_dict(), weights), "load_model returned different weights"
    fresh = _fresh_training_state()
    kind, value = _outcome(lambda: load_checkpoint(directory, *fresh), CheckpointError)
    if kind == "ok":
        assert _equal_states(_snapshot(*fresh), state), "load_checkpoint restored a different state"


def _set_sha(directory: Path, name: str) -> None:
    meta = json.loads((directory / META).read_text())
    meta["sha256"][name] = file_sha256(directory / name)
    (directory / META).write_text(json.dumps(meta))


@FEW
@given(name=st.sampled_from([WEIGHTS, STATE, META]), fix_sha=st.booleans(), data=st.data())
def test_checkpoint_damaged_files(checkpoint, name, fix_sha, data):
    src, weights, _, state = checkpoint
    directory = _copy_checkpoint(src)
    try:
        good = (directory / name).read_bytes()
        # with a matching SHA-256 (a rewritten checkpoint.json) the safetensors parser itself must refuse
        # random bytes and truncations; bit flips or a new tail in the tensor data would be a valid forgery,
        # so those only go without it (the SHA-256 check must catch them)
        # checkpoint.json carries a checksum of its own (meta_sha256), so it gets bit flips and new tails too:
        # an edit that keeps it valid JSON (a flipped digit in net.sigma_data or step) must be refused
        edits = name == META or not fix_sha
        forge = fix_sha and name != META
        (directory / name).write_bytes(data.draw(damaged(good, flips=edits, tails=edits, max_random=2000)))
        if forge:
            _set_sha(directory, name)
        _check_checkpoint(directory, weights, state)
    finally:
        shutil.rmtree(directory.parent)


@pytest.mark.parametrize("name", [WEIGHTS, STATE])
def test_checkpoint_safetensors_with_wrong_tensors(checkpoint, name):
    """Valid safetensors files with a matching SHA-256 but the wrong tensors: CheckpointError, no crash."""
    from safetensors.torch import load_file, save_file

    src, weights, _, state = checkpoint
    original = load_file(str(src / name))
    first = sorted(original)[0]
    variants = [
        {},
        {k: v for k, v in original.items() if k != first},
        {**original, first: torch.zeros(3, 5)},
        {**original, "extra": torch.zeros(1)},
        {**original, "rng.generator": torch.zeros(3)},
        {**original, "optim.x.step": torch.zeros(1)},
        {**original, "optim.0": torch.zeros(1)},
        {k: v.to(torch.int32) if k == "rng.generator" else v for k, v in original.items()},
    ]
    for tensors in variants:
        directory = _copy_checkpoint(src)
        try:
            save_file(tensors, str(directory / name))
            _set_sha(directory, name)
            _check_checkpoint(directory, weights, state)
        finally:
            shutil.rmtree(directory.parent)


def test_checkpoint_json_truncated_at_every_length(checkpoint):
    src, weights, _, _ = checkpoint
    directory = _copy_checkpoint(src)
    try:
        good = (src / META).read_bytes()
        for k in range(0, len(good), 7):
            (directory / META).write_bytes(good[:k])
            kind, value = _outcome(lambda: load_model(directory), CheckpointError)
            if kind == "ok":
                assert _equal_states(value[0].state_dict(), weights)
    finally:
        shutil.rmtree(directory.parent)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(-2, 2) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_NET_VALUES = st.one_of(st.integers(-2, 9), st.lists(st.integers(-2, 9), max_size=4), st.none(), st.text(max_size=2))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@FEW
@given(how=st.sampled_from(["replace", "drop", "net", "whole"]), data=st.data())
def test_checkpoint_json_with_wrong_structure(checkpoint, how, data):
    """checkpoint.json that parses but holds the wrong things: CheckpointError, or the exact saved state."""
    src, weights, meta, state = checkpoint
    directory = _copy_checkpoint(src)
    try:
        forged = copy.deepcopy(meta)
        if how == "whole":
            forged = data.draw(JSON.filter(lambda v: not isinstance(v, dict)) | JSON)
        elif how == "drop":
            del forged[data.draw(st.sampled_from(sorted(meta)))]
        elif how == "replace":
            forged[data.draw(st.sampled_from(sorted(meta)))] = data.draw(JSON)
        else:
            field = data.draw(st.sampled_from(["image_shape", "channels", "patch", "emb_dim", "unknown"]))
            forged["net"] = {**meta["net"], field: data.draw(_NET_VALUES)}
        (directory / META).write_text(json.dumps(forged))
        _check_checkpoint(directory, weights, state)
    finally:
        shutil.rmtree(directory.parent)


# ----------------------------------------------------------------------------- feature cache

SIGMAS = [1.0, 0.1, 0.01]


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    values = np.random.default_rng(0).random((6, len(SIGMAS))).astype(np.float32)
    saved = FeatureCache(directory, "sha-a").save("ds", SIGMAS, values)
    return FeatureCache(directory, "sha-a").path("ds", SIGMAS), saved


def _check_cache(path: Path, saved: FeatureSet | None) -> None:
    """FeatureCache.load: None with a "damaged; recomputing" warning for a file it cannot use, None without one
    only for another model/grid, else the stored set; never any other exception."""
    import warnings

    cache = FeatureCache(path.parent, "sha-a")
    assert cache.path("ds", SIGMAS) == path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, value = _outcome(lambda: cache.load("ds", SIGMAS), ValueError)
    assert kind == "ok", f"load raised {value!r}; a damaged cache is recomputed, not an error"
    damaged = [w for w in caught if issubclass(w.category, RuntimeWarning) and "is damaged" in str(w.message)]
    if damaged:
        assert value is None and len(damaged) == 1 and "\n" not in str(damaged[0].message)
        return
    try:  # what the file independently holds
        with np.load(path, allow_pickle=False) as f:
            stored, meta = f["values"], json.loads(str(f["meta"]))
    except Exception as exc:
        raise AssertionError(f"load returned {value!r} without a warning for an unreadable file ({exc})") from exc
    if value is None:  # documented: written for another model, dataset or σ grid
        assert isinstance(meta, dict)
        assert meta.get("model_sha256") != "sha-a" or meta.get("dataset") != "ds" or meta.get("sigmas") != SIGMAS
        return
    assert isinstance(value, FeatureSet)
    assert value.values.ndim == 2 and value.values.shape[1] == len(SIGMAS) and value.values.dtype.kind == "f"
    np.testing.assert_array_equal(value.values, stored)
    assert value.meta == meta and list(value.columns) == meta["columns"] and len(value.columns) == len(SIGMAS)
    if saved is not None:
        np.testing.assert_array_equal(value.values, saved.values)


@FUZZ
@given(data=st.data())
def test_feature_cache_damaged_file(feature_file, data):
    path, saved = feature_file
    good = path.read_bytes()
    victim = Path(tempfile.mkdtemp()) / path.name
    try:
        victim.write_bytes(data.draw(damaged(good)))
        _check_cache(victim, saved)
    finally:
        shutil.rmtree(victim.parent)


def test_feature_cache_truncated_at_every_length(feature_file):
    path, saved = feature_file
    good = path.read_bytes()
    victim = Path(tempfile.mkdtemp()) / path.name
    try:
        for k in range(len(good)):
            victim.write_bytes(good[:k])
            _check_cache(victim, saved)
    finally:
        shutil.rmtree(victim.parent)


@FUZZ
@given(values=st.one_of(st.none(), hnp.arrays(st.sampled_from(["f4", "f8", "u1", "U2", "?"]),
                                             hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))),
       meta=st.one_of(st.none(), JSON, st.builds(
           lambda sha, data, sig, cols, drop: {
               k: v for k, v in {"model_sha256": sha, "dataset": data, "sigmas": sig, "columns": cols}.items()
               if k != drop},
           st.sampled_from(["sha-a", "sha-b"]), st.sampled_from(["ds", "other"]),
           st.sampled_from([SIGMAS, SIGMAS[:2], [], "x", [[1.0]], None, [True, 0.1, 0.01]]),
           st.sampled_from([["a", "b", "c"], ["a", "b"], ["a"], "abc", None, 3, [1, 2, 3]]),
           st.sampled_from([None, "model_sha256", "dataset", "sigmas", "columns"]))),
       meta_as=st.sampled_from(["json", "bytes", "number", "not-json"]), npy=st.booleans())
def test_feature_cache_wrong_contents(work, values, meta, meta_as, npy):
    """Well-formed files holding the wrong things (other arrays, meta that is not the expected JSON)."""
    path = FeatureCache(work / "fc", "sha-a").path("ds", SIGMAS)
    path.parent.mkdir(exist_ok=True)
    payload = {}
    if values is not None:
        payload["values"] = values
    if meta is not None:
        text = json.dumps(meta)
        payload["meta"] = {"json": np.array(text), "bytes": np.frombuffer(text.encode(), np.uint8),
                           "number": np.array(3.0), "not-json": np.array(text[:-1] + "}}")}[meta_as]
    with open(path, "wb") as f:
        if npy:
            np.save(f, values if values is not None else np.zeros(3), allow_pickle=False)
        else:
            np.savez(f, **payload)
    _check_cache(path, None)


# ----------------------------------------------------------------------------- saved detectors


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    rng = np.random.default_rng(0)
    X, probe = rng.normal(size=(60, 3)), rng.normal(size=(20, 3))
    out = {}
    for name, det in [("knn", KNNDetector(n_neighbors=3)), ("gmm", GMMDetector(component_grid=(1, 2), cv=2))]:
        det.fit(X)
        directory = tmp_path_factory.mktemp(name)
        save_detector(det, directory, meta={"data": "ds"})
        out[name] = (directory, det.score_samples(probe), det.offset_)
    return out, probe


def _check_detector(directory: Path, scores: np.ndarray, offset: float, probe: np.ndarray) -> None:
    kind, value = _outcome(lambda: load_detector(directory), CheckpointError)
    if kind == "ok":
        det, _ = value
        np.testing.assert_array_equal(det.score_samples(probe), scores)
        assert det.offset_ == offset


def _copy_detector(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="det-")) / "det"
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(which=st.sampled_from(["knn", "gmm"]), name=st.sampled_from(["detector.json", "arrays.safetensors"]),
       data=st.data())
def test_detector_damaged_files(detectors, which, name, data):
    saved, probe = detectors
    src, scores, offset = saved[which]
    directory = _copy_detector(src)
    try:
        good = (directory / name).read_bytes()
        # no flips: detectors carry no checksum, so a flipped bit in a number is a valid (different) file
        (directory / name).write_bytes(data.draw(damaged(good, flips=False)))
        _check_detector(directory, scores, offset, probe)
    finally:
        shutil.rmtree(directory.parent)


@pytest.mark.parametrize("which", ["knn", "gmm"])
@pytest.mark.parametrize("name", ["detector.json", "arrays.safetensors"])
def test_detector_truncated_at_every_length(detectors, which, name):
    saved, probe = detectors
    src, scores, offset = saved[which]
    directory = _copy_detector(src)
    try:
        good = (src / name).read_bytes()
        for k in range(0, len(good), max(1, len(good) // 300)):
            (directory / name).write_bytes(good[:k])
            _check_detector(directory, scores, offset, probe)
        (directory / name).unlink()
        _check_detector(directory, scores, offset, probe)
    finally:
        shutil.rmtree(directory.parent)


@FUZZ
@given(which=st.sampled_from(["knn", "gmm"]), how=st.sampled_from(["whole", "drop", "replace", "drop-fitted",
                                                                  "drop-array", "reshape-array"]),
       data=st.data())
def test_detector_wrong_structure(detectors, which, how, data):
    """detector.json / arrays.safetensors that parse but hold the wrong things."""
    saved, probe = detectors
    src, scores, offset = saved[which]
    directory = _copy_detector(src)
    try:
        info = json.loads((src / "detector.json").read_text())
        arrays = st_load_np(str(src / "arrays.safetensors"))
        if how == "whole":
            info = data.draw(JSON)
        elif how == "drop":
            del info[data.draw(st.sampled_from(sorted(info)))]
        elif how == "replace":
            key = data.draw(st.sampled_from(sorted(set(info) - {"meta"})))
            info[key] = data.draw(JSON.filter(lambda v: v != info[key]))
        elif how == "drop-fitted":
            del info["fitted"][data.draw(st.sampled_from(sorted(info["fitted"])))]
        elif how == "drop-array":
            del arrays[data.draw(st.sampled_from(sorted(arrays)))]
        else:
            key = data.draw(st.sampled_from(sorted(arrays)))
            arrays[key] = np.ascontiguousarray(arrays[key].reshape(-1)[: max(0, arrays[key].size - 1)])
        (directory / "detector.json").write_text(json.dumps(info))
        st_save_np(arrays, str(directory / "arrays.safetensors"))
        _check_detector(directory, scores, offset, probe)
    finally:
        shutil.rmtree(directory.parent)


# ----------------------------------------------------------------------------- no pickles anywhere

_PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:  # docstrings and other bare string statements
                value = stmt.value if isinstance(stmt, ast.Expr) else None
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    ids.add(id(stmt.value))
    return ids


def _pickle_uses(source: str, filename: str) -> list[str]:
    """Code (not comments or docstrings) that could unpickle: pickle modules, allow_pickle not False, torch.load."""
    tree = ast.parse(source, filename)
    docs, found = _docstring_nodes(tree), []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Name) and node.id in _PICKLERS:
            found.append(f"{where} name {node.id}")
        elif isinstance(node, ast.Attribute) and (node.attr in _PICKLERS or "pickle" in node.attr.lower()):
            found.append(f"{where} attribute .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value.strip() in _PICKLERS:
                found.append(f"{where} string {node.value!r}")
        elif isinstance(node, ast.keyword) and node.arg and "pickle" in node.arg.lower():
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append(f"{where} {node.arg}={ast.unparse(node.value)}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith("torch.load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where} {func}(...) without weights_only=True")
            if func.endswith(("read_pickle", "to_pickle")) or func.split(".")[-1] in {"Unpickler", "load_pickle"}:
                found.append(f"{where} {func}(...)")
    return found


def test_no_code_path_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert files
    found = [hit for f in files for hit in _pickle_uses(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert not found, "\n".join(found)


def test_pickle_scan_catches_what_it_should():
    bad = [
        "import pickle\n", "from joblib import load\n", "np.load(p, allow_pickle=True)\n",
        "torch.load(p)\n", "torch.load(p, weights_only=False)\n", "x = __import__('pickle')\n",
        "pd.read_pickle(p)\n",
    ]
    for text in bad:
        assert _pickle_uses(text, "t.py"), text
    good = ['"""No pickles: pickle is never imported."""\n# import pickle\n', "np.load(p, allow_pickle=False)\n",
            "torch.load(p, weights_only=True)\n", "msg = 'saved without pickles'\n"]
    for text in good:
        assert not _pickle_uses(text, "t.py"), text
