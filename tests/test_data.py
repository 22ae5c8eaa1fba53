"""Tests for dgmood.data.datasets: IDX files, SPEC parsing, named/synthetic/custom sets, validation, download."""

import gzip
import io
import os
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgmood.data import datasets as data
from dgmood.data.datasets import DataError, describe, load_images, load_labels, parse_spec, read_idx, write_idx


def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX bytes built by hand (independent of write_idx): uint8 data only."""
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _err(spec, match, **kw):
    with pytest.raises(DataError, match=match) as info:
        load_images(spec, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- data dir


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DGMOOD_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("DGMOOD_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.resolve_data_dir() == tmp_path / "xdg" / "dgmood" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "dgmood" / "data"


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["x-ubyte", "x-ubyte.gz"])
def test_read_idx_hand_written(tmp_path, name):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(arr)
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    out = read_idx(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 7  # writable


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip_dtypes(tmp_path, dtype):
    arr = (np.arange(30).reshape(5, 6) - 3).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a-ubyte.gz", arr))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    assert (tmp_path / "a-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_idx_truncated(tmp_path):
    raw = _idx_bytes(np.zeros((10, 28, 28), np.uint8))
    (tmp_path / "t-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"t-ubyte is truncated.*again"):
        read_idx(tmp_path / "t-ubyte")
    (tmp_path / "t-ubyte.gz").write_bytes(gzip.compress(raw)[:-50])
    with pytest.raises(DataError, match=r"t-ubyte.gz is a truncated or corrupt gzip"):
        read_idx(tmp_path / "t-ubyte.gz")
    (tmp_path / "h-ubyte").write_bytes(raw[:9])
    with pytest.raises(DataError, match="h-ubyte has a truncated or corrupt IDX header"):
        read_idx(tmp_path / "h-ubyte")


def test_idx_corrupt(tmp_path):
    raw = _idx_bytes(np.zeros((2, 4), np.uint8))
    (tmp_path / "m-ubyte").write_bytes(b"\x01" + raw[1:])
    with pytest.raises(DataError, match="m-ubyte is not an IDX file"):
        read_idx(tmp_path / "m-ubyte")
    (tmp_path / "d-ubyte").write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(DataError, match="unknown IDX type code 0x07"):
        read_idx(tmp_path / "d-ubyte")
    (tmp_path / "x-ubyte").write_bytes(raw + b"junk")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(tmp_path / "x-ubyte")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope-ubyte")


def test_idx_file_as_spec(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 6), dtype=np.uint8)
    path = write_idx(tmp_path / "imgs-idx3-ubyte.gz", arr)
    x = load_images(str(path))
    assert x.shape == (7, 1, 5, 6)
    np.testing.assert_allclose(x[:, 0], arr / 255.0, atol=1e-7)
    assert load_images(f"{path}[2:4]").shape == (2, 1, 5, 6)


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def fmnist_train(data_dir):
    return load_images("fashion-mnist", data_dir)


def test_fashion_mnist_train(fmnist_train, data_dir):
    x = fmnist_train
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() == 0.0 and x.max() == 1.0
    labels = load_labels("fashion-mnist", data_dir)
    assert labels.shape == (60000,) and np.bincount(labels).tolist() == [6000] * 10


def test_fashion_mnist_test(fmnist_train, data_dir):
    x = load_images("fashion-mnist:test", data_dir)
    assert x.shape == (10000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(load_labels("fashion-mnist:test", data_dir)).tolist() == [1000] * 10
    assert not np.array_equal(x[:100], fmnist_train[:100])
    part = load_images("fashion-mnist:test[:2000]", data_dir, shape=(1, 28, 28))
    np.testing.assert_array_equal(part, x[:2000])


def test_mnist_default_split_and_partition(data_dir):
    full = load_images("mnist", data_dir)
    assert full.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(full, load_images("mnist:test", data_dir))
    train, test = load_images("mnist[:8000]", data_dir), load_images("mnist[8000:]", data_dir)
    assert len(train) == 8000 and len(test) == 2000
    np.testing.assert_array_equal(np.concatenate([train, test]), full)
    labels = load_labels("mnist", data_dir)
    np.testing.assert_array_equal(np.concatenate([load_labels("mnist[:8000]", data_dir),
                                                  load_labels("mnist[8000:]", data_dir)]), labels)
    assert load_images("mnist[-10:]", data_dir, n=3).shape == (3, 1, 28, 28)


def test_real_data_shape_mismatch(data_dir):
    msg = _err("mnist[:5]", "images are 28x28x1 but the model expects 32x32x3", data_dir=data_dir, shape=(3, 32, 32),
               resize="error")
    assert "resize them or train a model on this data" in msg
    # the default policy brings them to the model: 28 -> 32 on each side (a square needs no crop), grey -> RGB
    x = load_images("mnist[:5]", data_dir, shape=(3, 32, 32))
    assert x.shape == (5, 3, 32, 32) and np.array_equal(x[:, 0], x[:, 2])


def test_mnist_train_missing_is_reported(data_dir):
    msg = _err("mnist:train", "dgmood data download mnist", data_dir=data_dir)
    assert str(Path(data_dir) / "mnist" / "train-images-idx3-ubyte.gz") in msg


# ----------------------------------------------------------------------------- missing files, download


@pytest.mark.parametrize(("spec", "file"), [("fashion-mnist", "train-images-idx3-ubyte.gz"),
                                            ("fashion-mnist:test", "t10k-images-idx3-ubyte.gz"),
                                            ("mnist[:10]", "train-images-idx3-ubyte.gz")])
def test_missing_files(tmp_path, spec, file):
    name = spec.split(":")[0].split("[")[0]
    msg = _err(spec, "`dgmood data download", data_dir=tmp_path)
    assert f"at {tmp_path / name / file}" in msg and data.URLS[name] + file in msg
    with pytest.raises(DataError, match="dgmood data download"):
        load_labels(spec, tmp_path)


def test_mnist_default_prefers_train_when_present(tmp_path):
    (tmp_path / "mnist").mkdir()
    for split, value in (("train", 10), ("test", 20)):
        write_idx(data.dataset_file("mnist", split, data_dir=tmp_path), np.full((3, 4, 4), value, np.uint8))
    assert load_images("mnist", tmp_path)[0, 0, 0, 0] == pytest.approx(10 / 255)
    assert load_images("mnist:test", tmp_path)[0, 0, 0, 0] == pytest.approx(20 / 255)
    data.dataset_file("mnist", "train", data_dir=tmp_path).unlink()
    assert load_images("mnist", tmp_path)[0, 0, 0, 0] == pytest.approx(20 / 255)


class _FakeResponse(io.BytesIO):
    pass


def test_download_fake_urlopen(monkeypatch, tmp_path):
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        n = 6 if "/train-" in url else 4
        arr = np.full((n, 28, 28), 200, np.uint8) if "images" in url else np.arange(n, dtype=np.uint8)
        return _FakeResponse(gzip.compress(_idx_bytes(arr)))

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    logs = []
    paths = data.download("fashion-mnist", tmp_path, log=logs.append)
    assert sorted(p.name for p in paths) == sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir())
    assert len(seen) == 4 and all(u.startswith(data.URLS["fashion-mnist"]) for u in seen) and len(logs) == 4
    assert load_images("fashion-mnist", tmp_path).shape == (6, 1, 28, 28)
    assert load_labels("fashion-mnist:test[1:]", tmp_path).tolist() == [1, 2, 3]
    data.download("fashion-mnist", tmp_path)
    assert len(seen) == 4  # present files are not fetched again


def test_download_failures_leave_no_file(monkeypatch, tmp_path):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download .*no route to host.*by hand"):
        data.download("mnist", tmp_path)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"<html>"))
    with pytest.raises(DataError, match="not a valid IDX file"):
        data.download("mnist", tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []
    with pytest.raises(DataError, match="the named datasets are fashion-mnist, mnist, cifar10, tiny-imagenet, "
                                        "cifar100, svhn, celeba"):
        data.download("stl10", tmp_path)


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", ["uniform", "gaussian", "constant"])
def test_synthetic_range_shape_determinism(name):
    x = load_images(name)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x, load_images(name, seed=0))
    assert not np.array_equal(x, load_images(name, seed=1))
    np.testing.assert_array_equal(load_images(f"{name}[:500]"), x[:500])
    np.testing.assert_array_equal(load_images(f"{name}[9000:]"), x[9000:])
    y = load_images(name, shape=(3, 32, 32), n=64, seed=3)
    assert y.shape == (64, 3, 32, 32) and 0.0 <= y.min() and y.max() <= 1.0


def test_synthetic_distributions():
    u = load_images("uniform", n=200)
    assert abs(u.mean() - 0.5) < 0.01 and len(np.unique(u[0])) > 700
    g = load_images("gaussian", n=200)
    assert g.min() == 0.0 and g.max() == 1.0  # clipped, not rescaled
    assert 0.25 < (g == 0.0).mean() < 0.4 and 0.25 < (g == 1.0).mean() < 0.4  # P(N(.5,1) < 0) ~ 0.31
    c = load_images("constant", n=200)
    assert np.all(c == c[:, :1, :1, :1]) and len(np.unique(c[:, 0, 0, 0])) == 200


def test_synthetic_bad_inputs():
    _err("uniform[:20000]", "out of range")
    _err("uniform[5:5]", "selects no images")
    _err("uniform", "n must be a positive integer", n=0)
    _err("uniform", r"shape must be \(C, H, W\)", shape=(28, 28))
    _err("gaussian:test", "takes no split")


# ----------------------------------------------------------------------------- npy / npz


def test_npy_uint8_nhw(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 9), dtype=np.uint8)
    np.save(tmp_path / "x.npy", arr)
    x = load_images(str(tmp_path / "x.npy"))
    assert x.shape == (5, 1, 8, 9) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], arr / 255.0, atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_npy_float_nhwc(tmp_path, channels):
    arr = np.random.default_rng(1).random((4, 6, 7, channels))
    np.save(tmp_path / "x.npy", arr)
    x = load_images(str(tmp_path / "x.npy"), shape=(channels, 6, 7))
    assert x.shape == (4, channels, 6, 7) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, arr.transpose(0, 3, 1, 2), rtol=1e-6)
    np.testing.assert_array_equal(load_images(f"{tmp_path / 'x.npy'}[1:3]"), x[1:3])


def test_npz_keys(tmp_path):
    a, b = np.zeros((3, 4, 4), np.uint8), np.ones((2, 4, 4), np.float32)
    np.savez(tmp_path / "s.npz", train=a, test=b)
    np.savez(tmp_path / "one.npz", images=b)
    assert load_images(f"{tmp_path / 's.npz'}:train").shape == (3, 1, 4, 4)
    assert load_images(f"{tmp_path / 's.npz'}:test[1:]").max() == 1.0
    assert load_images(str(tmp_path / "one.npz")).shape == (2, 1, 4, 4)
    _err(str(tmp_path / "s.npz"), r"holds 2 arrays \(train, test\); pick one with .*s.npz:train")
    _err(f"{tmp_path / 's.npz'}:val", "has no array 'val'; its arrays are train, test")


@pytest.mark.parametrize(("arr", "match"), [
    (np.zeros((5, 784), np.uint8), r"shape \(5, 784\); expected \(N, H, W\) or \(N, H, W, C\)"),
    (np.zeros((5, 8, 8, 2), np.uint8), "C = 1 or 3"),
    (np.zeros((5, 3, 8, 8), np.uint8), "channels first.*transpose"),
    (np.zeros((0, 8, 8), np.uint8), "is empty"),
    (np.zeros((3, 8, 8), np.int64), "dtype int64; save images as uint8"),
    (np.full((3, 8, 8), np.nan, np.float32), "NaN or inf"),
    (np.full((3, 8, 8), np.inf), "NaN or inf"),
    (np.linspace(-1, 1, 192).reshape(3, 8, 8), r"values in \[-1, 1\] but images must lie in \[0, 1\]; rescale"),
])
def test_npy_bad_arrays(tmp_path, arr, match):
    np.save(tmp_path / "bad.npy", arr)
    msg = _err(str(tmp_path / "bad.npy"), match)
    assert "bad.npy" in msg


def test_npy_npz_corrupt_files(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((100, 8, 8), np.uint8))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
    _err(str(tmp_path / "t.npy"), r"cannot read .*t.npy .*save it with numpy.save")
    np.save(tmp_path / "o.npy", np.array([object()] * 3))
    _err(str(tmp_path / "o.npy"), "cannot read .*o.npy")
    np.savez(tmp_path / "z.npz", a=np.zeros((100, 8, 8)))
    raw = (tmp_path / "z.npz").read_bytes()
    (tmp_path / "z.npz").write_bytes(raw[: len(raw) // 2])
    _err(str(tmp_path / "z.npz"), r"cannot read .*z.npz")
    _err(str(tmp_path / "missing.npy"), "missing.npy does not exist")


def test_custom_shape_mismatch(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 32, 32, 3), np.uint8))
    _err(str(tmp_path / "c.npy"), "images are 32x32x3 but the model expects 28x28x1; resize them", shape=(1, 28, 28),
         resize="error")


# ----------------------------------------------------------------------------- image folders


def test_png_folder(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    for i, name in enumerate(["b.png", "c.png", "a.png"]):
        Image.fromarray(grey[i], "L").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    x = load_images(str(tmp_path))
    assert x.shape == (3, 1, 6, 5)
    np.testing.assert_allclose(x[:, 0], grey[[2, 0, 1]] / 255.0, atol=1e-7)  # sorted by name
    rgb_dir = tmp_path / "rgb"
    rgb_dir.mkdir()
    rgb = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    for i in range(2):
        Image.fromarray(rgb[i], "RGB").save(rgb_dir / f"{i}.png")
    y = load_images(f"{rgb_dir}[1:]", shape=(3, 4, 4))
    np.testing.assert_allclose(y[0], rgb[1].transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_png_folder_bad(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("L", (8, 8)).save(mixed / "a.png")
    Image.new("L", (9, 8)).save(mixed / "b.png")
    _err(str(mixed), r"b.png: the image is 8x9 but the model takes 8x8; resize it, or pass --resize", shape=(1, 8, 8),
         resize="error")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image")
    _err(str(empty), r"has no images \(1 not an image skipped\); put PNG/JPEG files in it")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    _err(str(broken), r"x.png: not an image Pillow can read .*pass --skip-bad", shape=(1, 8, 8))


# ----------------------------------------------------------------------------- SPEC grammar


def test_parse_and_describe():
    s = parse_spec("fashion-mnist:test[:2000]")
    assert (s.kind, s.name, s.split, s.start, s.stop) == ("named", "fashion-mnist", "test", None, 2000)
    assert parse_spec("fashion-mnist").split == "train" and parse_spec("mnist").split is None
    assert describe("Fashion_MNIST:train[0:100]") == "fashion-mnist[:100]"
    assert describe("mnist[8000:]") == "mnist[8000:]"
    assert describe("mnist:test[-5:]") == "mnist:test[-5:]"
    assert describe("uniform[:500]") == "uniform[:500]"
    assert describe("d/x.npz:key[1:2]") == "d/x.npz:key[1:2]"
    assert str(parse_spec("gaussian")) == "gaussian"
    assert parse_spec("d/x-idx3-ubyte.gz").kind == "idx"
    assert parse_spec("d/x.npy").kind == "npy" and parse_spec("d/imgs/").kind == "folder"


def test_unknown_and_bad_specs(tmp_path):
    msg = _err("stl10", "unknown dataset 'stl10'")
    for phrase in ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet", "celeba", "uniform",
                   "gaussian", "constant", ".npy", ".npz", "-ubyte", ".zip", ".tar.gz"):
        assert phrase in msg
    _err("mnist:val", "unknown split 'val' for mnist; use mnist:train or mnist:test")
    _err("mnist[::2]", r"bad slice .*\[start:stop\]")
    _err("mnist[3]", "bad slice")
    _err("", "empty dataset spec")
    (tmp_path / "x.csv").write_text("1,2")
    _err(str(tmp_path / "x.csv"), "cannot tell the format")
    with pytest.raises(DataError, match="has no labels"):
        load_labels("uniform")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
    assert set(data.__all__) <= set(dir(data))
    assert os.fspath(data.dataset_file("mnist", "test", data_dir="/d")) == "/d/mnist/t10k-images-idx3-ubyte.gz"


def test_shared_images_sees_a_test_set_that_is_the_training_set(tmp_path):
    from dgmood.data.datasets import dataset_file, shared_images

    path = dataset_file("mnist", "test", "images", tmp_path)  # only MNIST's test file here: "mnist" means it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    assert shared_images("mnist", "mnist:test", tmp_path)
    assert shared_images("mnist[:5000]", "mnist:test[4000:]", tmp_path)
    assert not shared_images("mnist:test[:7000]", "mnist:test[7000:]", tmp_path)
    assert not shared_images("fashion-mnist", "fashion-mnist:test", tmp_path)
    assert not shared_images("mnist", "fashion-mnist:test", tmp_path)


def test_a_run_refuses_a_test_set_of_its_own_training_images(tmp_path):
    from dgmood.app.runs import Run, RunConfig
    from dgmood.data.datasets import DataError, dataset_file

    path = dataset_file("mnist", "test", "images", tmp_path / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    run = Run(tmp_path / "run", data_dir=tmp_path / "data")
    with pytest.raises(DataError, match="holds training images"):
        run.create(RunConfig(data="mnist", in_test="mnist:test"))
    assert run.create(RunConfig(data="mnist:test[:7000]", in_test="mnist:test[7000:]")).in_test == "mnist:test[7000:]"
