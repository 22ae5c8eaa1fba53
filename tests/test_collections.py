"""Real image collections: nested folders, zip and tar archives, any size and mode, the resize policies against
Pillow itself, bad files among good ones, streaming in chunks, and the official CIFAR-10 / Tiny ImageNet releases
(small files made here in their formats; nothing is downloaded)."""

import io
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from dgmood.data import datasets as data
from dgmood.data import releases
from dgmood.data.datasets import DataError, iter_chunks, load_images, open_collection
from dgmood.data.images import BadImage, ImagePolicy, decode, fit_array, header

RNG = np.random.default_rng(0)


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims width × height pixels (no pixel data follows)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.fixture
def nested(tmp_path):
    """An ImageFolder tree of 6 RGB images (two classes, 32×32 and 48×40), a hidden file and a text file."""
    root = tmp_path / "train"
    files = {"cat/b.png": _png(_rgb(32, 32)), "cat/a.jpg": _jpeg(_rgb(32, 32)), "dog/x/c.png": _png(_rgb(32, 32)),
             "dog/d.png": _png(_rgb(48, 40)), "dog/e.png": _png(_rgb(32, 32)), "f.png": _png(_rgb(32, 32)),
             ".hidden/g.png": _png(_rgb(32, 32)), "cat/.DS_Store": b"junk", "README.txt": b"notes"}
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root, files


ORDER = ["cat/a.jpg", "cat/b.png", "dog/d.png", "dog/e.png", "dog/x/c.png", "f.png"]


def _zip(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return path


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


# ----------------------------------------------------------------------------- containers


def test_nested_folder_zip_and_tar_read_the_same_images(nested, tmp_path):
    root, files = nested
    folder = open_collection(str(root))
    assert folder.members == ORDER and folder.skipped == {"hidden": 2, "not an image": 1}
    zipped = open_collection(str(_zip(tmp_path / "t.zip", files)))
    assert zipped.members == ORDER and zipped.skipped == folder.skipped
    tarred = open_collection(str(_tar(tmp_path / "t.tar.gz", dict(sorted(files.items())))))
    assert tarred.members == ORDER  # stored order, here sorted
    x = load_images(str(root), shape=(3, 32, 32))
    for spec in (tmp_path / "t.zip", tmp_path / "t.tar.gz"):
        np.testing.assert_array_equal(load_images(str(spec), shape=(3, 32, 32)), x)
    # the most common size is the default shape, the odd one is cropped to it; slices and sources follow the order
    assert load_images(str(root)).shape == (6, 3, 32, 32)
    assert data.image_sources(f"{tmp_path / 't.zip'}[2:4]", 9) == ["dog/d.png", "dog/e.png"]
    np.testing.assert_array_equal(load_images(f"{tmp_path / 't.tar.gz'}[1:3]", shape=(3, 32, 32)), x[1:3])


def test_tar_streams_in_stored_order(tmp_path):
    files = {"z.png": _png(_rgb(8, 8)), "a.png": _png(_rgb(8, 8)), "m.png": _png(_rgb(8, 8))}
    collection = open_collection(str(_tar(tmp_path / "u.tar", files)))
    assert collection.members == ["z.png", "a.png", "m.png"]
    got = [name for name, _ in collection.read(1, 3)]
    assert got == ["a.png", "m.png"]


def test_empty_and_broken_containers(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder .* has no images; put PNG/JPEG files"):
        load_images(str(tmp_path / "empty"))
    _zip(tmp_path / "e.zip", {"notes.txt": b"x"})
    with pytest.raises(DataError, match=r"archive .* has no images \(1 not an image skipped\)"):
        load_images(str(tmp_path / "e.zip"))
    (tmp_path / "cut.zip").write_bytes(_zip(tmp_path / "ok.zip", {"a.png": _png(_rgb(4, 4))}).read_bytes()[:30])
    with pytest.raises(DataError, match="truncated or corrupt, copy or download it again"):
        load_images(str(tmp_path / "cut.zip"))


# ----------------------------------------------------------------------------- modes


def test_modes_come_out_as_the_models_channels():
    grey = Image.fromarray(RNG.integers(0, 256, (6, 5), dtype=np.uint8), "L")
    arr, size = decode(_png(grey), "g.png", ImagePolicy((3, 6, 5)))
    assert size == (6, 5) and np.array_equal(arr[0], np.asarray(grey)) and np.array_equal(arr[0], arr[2])
    rgb = _rgb(6, 5)
    arr, _ = decode(_png(rgb), "c.png", ImagePolicy((1, 6, 5)))
    np.testing.assert_array_equal(arr[0], np.asarray(rgb.convert("L")))
    # RGBA on white: a fully transparent pixel becomes white, an opaque one keeps its colour
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    arr, _ = decode(_png(Image.fromarray(rgba, "RGBA")), "a.png", ImagePolicy((3, 2, 2)))
    assert arr[:, 0, 0].tolist() == [10, 20, 30] and arr[:, 1, 1].tolist() == [255, 255, 255]
    # a palette image with a transparent index: the same
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    arr, _ = decode(_png(pal, transparency=1), "p.png", ImagePolicy((3, 2, 2)))
    assert arr[:, 0, 0].tolist() == [200, 0, 0] and arr[:, 0, 1].tolist() == [255, 255, 255]
    # 16-bit grey: v / 257
    sixteen = np.array([[0, 257 * 7], [65535, 257 * 128]], np.uint16)
    arr, _ = decode(_png(Image.fromarray(sixteen)), "w.png", ImagePolicy((1, 2, 2)))
    assert arr[0].tolist() == [[0, 7], [255, 128]]
    assert header(_png(Image.fromarray(sixteen)), "w.png") == (1, 2, 2)


def test_exif_rotated_jpeg_comes_out_upright():
    """A camera stores a portrait photo sideways with orientation 6 (rotate 90° clockwise to view)."""
    upright = np.zeros((40, 24, 3), np.uint8)
    upright[:8] = 255  # a white band at the top of the upright picture
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote: 24 high, 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    blob = _jpeg(stored, exif=exif, quality=95)
    assert header(blob, "p.jpg") == (3, 40, 24)
    arr, size = decode(blob, "p.jpg", ImagePolicy((1, 40, 24)))
    assert size == (40, 24) and arr[0, :6].mean() > 240 and arr[0, 12:].mean() < 15


# ----------------------------------------------------------------------------- resize policies


@pytest.mark.parametrize("h,w", [(60, 40), (40, 60), (16, 16), (7, 11)])
def test_each_resize_policy_matches_pillow(h, w):
    im = _rgb(h, w)
    blob = _png(im)
    target = (20, 20)
    # crop: cut the centre box of the target's aspect ratio from the original, then one antialiased resize
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    references = {"crop": im.resize((20, 20), Image.Resampling.BILINEAR, box=box),
                  "stretch": im.resize((20, 20), Image.Resampling.BILINEAR),
                  "pad": ImageOps.pad(im, (20, 20), Image.Resampling.BILINEAR, color=0)}
    for policy, reference in references.items():
        arr, size = decode(blob, "x.png", ImagePolicy((3, *target), policy))
        assert size == (h, w)
        np.testing.assert_array_equal(arr.transpose(1, 2, 0), np.asarray(reference), err_msg=policy)
    # pad keeps the whole image: black bars on the short side's ends
    padded, _ = decode(blob, "x.png", ImagePolicy((3, *target), "pad"))
    if h > w:
        assert padded[:, :, 0].max() == 0 and padded[:, :, -1].max() == 0
    with pytest.raises(BadImage, match=f"the image is {h}x{w} but the model takes 20x20; resize it, or pass --resize"):
        decode(blob, "x.png", ImagePolicy((3, *target), "error"))


def test_same_size_is_never_resampled_and_arrays_follow_the_policy():
    im = _rgb(20, 20)
    for policy in ("crop", "stretch", "pad", "error"):
        arr, _ = decode(_png(im), "x.png", ImagePolicy((3, 20, 20), policy))
        np.testing.assert_array_equal(arr.transpose(1, 2, 0), np.asarray(im))
    x = np.asarray(_rgb(30, 20), np.float32).transpose(2, 0, 1)[None] / 255
    out = fit_array(x, ImagePolicy((3, 10, 10), "stretch"))
    reference = [np.asarray(Image.fromarray(c, "F").resize((10, 10), Image.Resampling.BILINEAR)) for c in x[0]]
    np.testing.assert_allclose(out[0], np.clip(np.stack(reference), 0, 1), atol=1e-6)
    assert fit_array(x, ImagePolicy((1, 30, 20))).shape == (1, 1, 30, 20)
    with pytest.raises(BadImage):
        fit_array(x, ImagePolicy((3, 10, 10), "error"))


def test_large_jpeg_is_drafted_to_no_less_than_needed():
    big = Image.fromarray(np.kron(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8), np.ones((32, 32, 1), np.uint8)))
    blob = _jpeg(big, quality=95)  # 512×512, smooth 32×32 blocks
    arr, size = decode(blob, "big.jpg", ImagePolicy((3, 32, 32)))
    full = np.asarray(big.resize((32, 32), Image.Resampling.BILINEAR), np.float64)
    assert size == (512, 512) and np.abs(arr.transpose(1, 2, 0) - full).mean() < 4


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def with_bad(tmp_path):
    good = {f"ok/{i}.png": _png(_rgb(12, 12)) for i in range(5)}
    bad = {"ok/2a.png": b"", "ok/3a.jpg": _jpeg(_rgb(64, 64))[:700], "ok/4a.png": _bomb_png(),
           "ok/1a.png": b"not an image at all"}
    return _zip(tmp_path / "mixed.zip", {**good, **bad}), bad


def test_bad_files_stop_with_one_line_or_are_skipped(with_bad):
    path, bad = with_bad
    with pytest.raises(DataError) as info:
        load_images(str(path), shape=(3, 12, 12))
    assert "ok/1a.png: not an image Pillow can read" in str(info.value) and "--skip-bad" in str(info.value)
    assert "\n" not in str(info.value)
    chunks = list(iter_chunks(str(path), (3, 12, 12), skip_bad=True, chunk=4))
    assert sum(len(c.images) for c in chunks) == 5 and all(c.images.shape[1:] == (3, 12, 12) for c in chunks)
    reasons = {source: reason for c in chunks for _, source, reason in c.bad}
    assert set(reasons) == set(bad)
    assert "empty (0 bytes)" in reasons["ok/2a.png"]
    assert "truncated or corrupt" in reasons["ok/3a.jpg"]
    assert "decompression bomb" in reasons["ok/4a.png"]
    sources = [s for c in chunks for s in c.sources]
    assert sources == [f"ok/{i}.png" for i in range(5)]
    index = np.concatenate([c.index for c in chunks])
    assert index.tolist() == [0, 1, 3, 5, 7]  # positions in the sorted listing (ok/1a.png sorts after ok/1.png)


def test_chunks_are_bounded_and_in_order(tmp_path):
    files = {f"{i:03d}.png": _png(Image.fromarray(np.full((6, 6), i, np.uint8), "L")) for i in range(23)}
    path = _zip(tmp_path / "n.zip", files)
    chunks = list(iter_chunks(str(path), (1, 6, 6), chunk=5))
    assert [len(c.images) for c in chunks] == [5, 5, 5, 5, 3]
    levels = np.concatenate([c.images[:, 0, 0, 0] for c in chunks]) * 255
    np.testing.assert_allclose(levels, np.arange(23), atol=1e-4)
    assert np.concatenate([c.sizes for c in chunks]).tolist() == [[6, 6]] * 23
    arrays = list(iter_chunks("uniform[:7]", (3, 8, 8), chunk=3))
    assert [c.sources[0] for c in arrays] == ["uniform[:7]#0", "uniform[:7]#3", "uniform[:7]#6"]


# ----------------------------------------------------------------------------- named sets and official releases


def test_named_photo_sets_resolve_to_the_archives(tmp_path):
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    _zip(root / "cifar10" / "cifar10-test.zip", {f"test/cat/{i:04d}.jpg": _jpeg(_rgb(32, 32)) for i in range(3)})
    (root / "tiny-imagenet").mkdir()
    _zip(root / "tiny-imagenet" / "tiny-imagenet-200.zip",
         {"tiny-imagenet-200/val/images/val_0.JPEG": _jpeg(_rgb(64, 64)),
          "tiny-imagenet-200/train/x/a.JPEG": _jpeg(_rgb(64, 64))})
    assert load_images("cifar10:test", root).shape == (3, 3, 32, 32)
    assert data.load_labels("cifar10:test", root).tolist() == [0, 0, 0]
    assert data.image_sources("cifar10:test[1:]", 5, root) == ["test/cat/0001.jpg", "test/cat/0002.jpg"]
    x = load_images("tiny-imagenet", root, shape=(3, 32, 32))
    assert x.shape == (1, 3, 32, 32)  # the official zip's val/images only
    with pytest.raises(DataError, match="cifar10 train not found: put cifar10-train.zip .*dgmood data download cifar10"):
        load_images("cifar10", root)
    with pytest.raises(DataError, match="use cifar10:train or cifar10:test"):
        load_images("cifar10:val", root)


def _cifar_release(path):
    images = {"train": RNG.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
              "test": RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)}
    labels = {"train": np.arange(10) % 10, "test": np.array([3, 1, 4, 1])}
    return releases.write_cifar10_binary(path, images, labels), images, labels


def test_cifar10_binary_release_is_read_from_raw_bytes(tmp_path):
    path, images, labels = _cifar_release(tmp_path / "cifar-10-binary.tar.gz")
    x, y = releases.read_cifar10_binary(path, "train")
    np.testing.assert_array_equal(x, images["train"])
    np.testing.assert_array_equal(y, labels["train"])
    # record layout, checked by hand on the first test image: label byte, then the red plane row by row
    with tarfile.open(path) as tf:
        raw = tf.extractfile("cifar-10-batches-bin/test_batch.bin").read()
    assert raw[0] == 3 and raw[1:1025] == images["test"][0, :, :, 0].tobytes()
    root = tmp_path / "d"
    (root / "cifar10").mkdir(parents=True)
    path.rename(root / releases.CIFAR10_BINARY)
    np.testing.assert_allclose(load_images("cifar10:test", root) * 255, images["test"].transpose(0, 3, 1, 2), atol=1e-4)
    (root / releases.CIFAR10_BINARY).write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(DataError, match="truncated or corrupt, download it again"):
        load_images("cifar10", root)


class _Response(io.BytesIO):
    pass


def test_download_photo_releases_without_the_network(monkeypatch, tmp_path):
    blob = _cifar_release(tmp_path / "release.tar.gz")[0].read_bytes()
    tiny = _zip(tmp_path / "tiny.zip", {"tiny-imagenet-200/val/images/val_0.JPEG": _jpeg(_rgb(64, 64))}).read_bytes()
    seen = []

    def fake(url, timeout=None):
        seen.append(url)
        return _Response(blob if url == releases.CIFAR10_URL else tiny)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake)
    root = tmp_path / "data"
    assert data.download("cifar10", root) == [root / "cifar10" / "cifar-10-binary.tar.gz"]
    assert data.download("tiny-imagenet", root) == [root / "tiny-imagenet" / "tiny-imagenet-200.zip"]
    assert seen == [releases.CIFAR10_URL, releases.TINY_IMAGENET_URL]
    assert load_images("cifar10", root).shape == (10, 3, 32, 32)
    assert data.load_labels("cifar10[2:5]", root).tolist() == [2, 3, 4]
    assert load_images("tiny-imagenet", root).shape == (1, 3, 64, 64)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: _Response(b"<html>"))
    with pytest.raises(DataError, match="not a valid release"):
        data.download("cifar10", tmp_path / "other")
    assert list((tmp_path / "other" / "cifar10").iterdir()) == []


def test_worker_processes_decode_as_threads_do(with_bad, monkeypatch):
    """Both decoding pools give the same chunks, bad files included (BadImage crosses the process boundary)."""
    from dgmood.data.stream import stream_collection

    path, bad = with_bad
    collection = open_collection(str(path))
    policy = ImagePolicy((3, 12, 12))
    runs = {kind: list(stream_collection(collection, policy, chunk=4, skip_bad=True, workers=2, kind=kind))
            for kind in ("threads", "processes")}
    for a, b in zip(*runs.values(), strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        assert a.sources == b.sources and a.bad == b.bad and a.index.tolist() == b.index.tolist()
    monkeypatch.setenv("DGMOOD_DECODE", "processes")
    with pytest.raises(DataError, match="ok/1a.png: not an image"):
        load_images(str(path), shape=(3, 12, 12))


# ----------------------------------------------------------------------------- CIFAR-100, SVHN, CelebA


def _cifar100_release(path):
    images = {"train": RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
              "test": RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}
    labels = {"train": np.array([0, 99, 42, 7, 58, 13]), "test": np.array([71, 5, 99])}
    return releases.write_cifar100_binary(path, images, labels), images, labels


def test_cifar100_binary_release_reads_fine_labels(tmp_path):
    root = tmp_path / "data"
    (root / "cifar100").mkdir(parents=True)
    path, images, labels = _cifar100_release(root / releases.CIFAR100_BINARY)
    with tarfile.open(path) as tf:  # record layout by hand: coarse byte, fine byte, the red plane row by row
        raw = tf.extractfile("cifar-100-binary/test.bin").read()
    assert len(raw) == 3 * 3074 and raw[:2] == bytes([71 // 5, 71])
    assert raw[2:1026] == images["test"][0, :, :, 0].tobytes()
    x, y = releases.read_cifar100_binary(path, "train")
    np.testing.assert_array_equal(x, images["train"])
    assert y.tolist() == labels["train"].tolist()
    np.testing.assert_allclose(load_images("cifar100:test", root) * 255, images["test"].transpose(0, 3, 1, 2),
                               atol=1e-4)
    assert data.load_labels("cifar100[1:4]", root).tolist() == [99, 42, 7]
    assert str(data.parse_spec("cifar100:test[:2]")) == "cifar100:test[:2]"
    assert str(data.parse_spec("CIFAR100")) == "cifar100"
    with pytest.raises(DataError, match="cifar100 train not found: put cifar-100-binary.tar.gz .*download cifar100"):
        load_images("cifar100", tmp_path / "empty")
    with pytest.raises(DataError, match="use cifar100:train or cifar100:test"):
        load_images("cifar100:valid", root)


def _svhn_mat(path, n, compress):
    import scipy.io

    x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.float64)[:, None]  # 1..10, 10 is the digit 0
    scipy.io.savemat(path, {"X": x, "y": y}, do_compression=compress)
    return x, y


@pytest.mark.parametrize("compress", [False, True])
def test_mat_reader_matches_scipy(tmp_path, compress):
    import scipy.io

    from dgmood.data.matfile import read_mat

    arrays = {"X": RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8), "y": np.array([[10.0], [1], [2], [9]]),
              "f": RNG.random((2, 3)).astype(np.float32), "i": np.arange(-3, 3, dtype=np.int16).reshape(3, 2),
              "s": np.float64(2.5), "e": np.zeros((0, 3))}
    scipy.io.savemat(tmp_path / "a.mat", arrays, do_compression=compress)
    mine, theirs = read_mat(tmp_path / "a.mat"), scipy.io.loadmat(tmp_path / "a.mat")
    assert set(mine) == set(arrays)
    for name, value in mine.items():
        assert value.dtype == theirs[name].dtype and value.shape == theirs[name].shape, name
        np.testing.assert_array_equal(value, theirs[name])
    assert set(read_mat(tmp_path / "a.mat", ("y",))) == {"y"}


def test_mat_reader_refuses_objects_and_bad_files(tmp_path):
    import scipy.io

    from dgmood.data.matfile import read_mat

    x = np.zeros((32, 32, 3, 1), np.uint8)
    scipy.io.savemat(tmp_path / "c.mat", {"X": x, "c": np.array([[1, "a"]], dtype=object)}, do_compression=True)
    scipy.io.savemat(tmp_path / "s.mat", {"y": {"a": 1}, "X": x})
    with pytest.raises(DataError, match="variable 'c' of .*c.mat is a cell array; only real numeric matrices") as info:
        read_mat(tmp_path / "c.mat")
    assert "\n" not in str(info.value)
    assert read_mat(tmp_path / "c.mat", ("X",))["X"].shape == (32, 32, 3, 1)  # the cell is skipped unread
    with pytest.raises(DataError, match="variable 'y' of .*s.mat is a struct"):
        releases.read_svhn(tmp_path / "s.mat")
    scipy.io.savemat(tmp_path / "z.mat", {"z": np.array([1 + 2j])})
    with pytest.raises(DataError, match="is a complex matrix"):
        read_mat(tmp_path / "z.mat")
    blob = (tmp_path / "c.mat").read_bytes()
    (tmp_path / "cut.mat").write_bytes(blob[:200])
    with pytest.raises(DataError, match="truncated"):
        read_mat(tmp_path / "cut.mat")
    (tmp_path / "junk.mat").write_bytes(b"<html>" * 30)
    with pytest.raises(DataError, match="not a MATLAB v5 .mat file"):
        read_mat(tmp_path / "junk.mat")
    with pytest.raises(DataError, match="has no X .*not SVHN's cropped digits"):
        releases.read_svhn(tmp_path / "c.mat")


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_named_specs(tmp_path, compress):
    root = tmp_path / "data"
    (root / "svhn").mkdir(parents=True)
    x, y = _svhn_mat(root / releases.SVHN_FILES["train"], 12, compress)
    _svhn_mat(root / releases.SVHN_FILES["test"], 3, not compress)
    images, labels = releases.read_svhn(root / releases.SVHN_FILES["train"])
    np.testing.assert_array_equal(images, x.transpose(3, 0, 1, 2))
    assert labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    np.testing.assert_allclose(load_images("svhn[:5]", root) * 255, x.transpose(3, 2, 0, 1)[:5], atol=1e-4)
    assert data.load_labels("svhn[8:]", root).tolist() == [9, 0, 1, 2]
    assert load_images("svhn:test", root, shape=(1, 28, 28)).shape == (3, 1, 28, 28)
    with pytest.raises(DataError, match=r"svhn extra not found: put extra_32x32.mat \(from http.*extra_32x32.mat\) at"):
        load_images("svhn:extra", root)


def test_download_cifar100_and_svhn_without_the_network(monkeypatch, tmp_path):
    cifar = _cifar100_release(tmp_path / "c.tar.gz")[0].read_bytes()
    _svhn_mat(tmp_path / "train.mat", 4, True)
    _svhn_mat(tmp_path / "test.mat", 2, False)
    blobs = {releases.CIFAR100_URL: cifar,
             releases.SVHN_URL + "train_32x32.mat": (tmp_path / "train.mat").read_bytes(),
             releases.SVHN_URL + "test_32x32.mat": (tmp_path / "test.mat").read_bytes()}
    seen = []

    def fake(url, timeout=None):
        seen.append(url)
        return _Response(blobs[url])

    monkeypatch.setattr(data.urllib.request, "urlopen", fake)
    root = tmp_path / "data"
    assert data.download("cifar100", root) == [root / releases.CIFAR100_BINARY]
    assert data.download("svhn", root) == [root / releases.SVHN_FILES["train"], root / releases.SVHN_FILES["test"]]
    assert seen == list(blobs)
    assert data.download("svhn", root) == [root / releases.SVHN_FILES["train"], root / releases.SVHN_FILES["test"]]
    assert len(seen) == 3  # present files are not fetched again
    assert load_images("cifar100", root).shape == (6, 3, 32, 32)
    assert load_images("svhn:test", root).shape == (2, 3, 32, 32)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: _Response(b"<html>" * 40))
    with pytest.raises(DataError, match="not a valid release .*not a MATLAB v5 .mat file"):
        data.download("svhn", tmp_path / "other")
    assert list((tmp_path / "other" / "svhn").iterdir()) == []


def _celeba(root):
    (root / "celeba").mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(1, 8)]
    files = {f"img_align_celeba/{n}": _jpeg(_rgb(218, 178)) for n in reversed(names)}
    files["img_align_celeba/000004.jpg"] = _jpeg(_rgb(100, 100))  # another size: the split is filtered, then read
    _zip(root / releases.CELEBA_ZIP, files)
    parts = [0, 0, 1, 2, 0, 2, 1]
    (root / releases.CELEBA_PARTITION).write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))


def test_celeba_splits_follow_the_partition_list(tmp_path, monkeypatch):
    root = tmp_path / "data"
    with pytest.raises(DataError, match="CelebA has no plain download URL .*img_align_celeba.zip and "
                                        "list_eval_partition.txt from https://mmlab") as info:
        data.download("celeba", root)
    assert str(root / "celeba" / "img_align_celeba.zip") in str(info.value) and "\n" not in str(info.value)
    assert str(root / "celeba" / "list_eval_partition.txt") in str(info.value)
    with pytest.raises(DataError, match="CelebA has no plain download URL"):
        load_images("celeba", root)
    _celeba(root)
    monkeypatch.setattr(data.urllib.request, "urlopen", None)  # nothing is fetched when both files are there
    assert data.download("celeba", root) == [root / releases.CELEBA_ZIP, root / releases.CELEBA_PARTITION]
    assert open_collection("celeba", root).members == ["000001.jpg", "000002.jpg", "000005.jpg"]
    assert data.image_sources("celeba:valid", 9, root) == ["000003.jpg", "000007.jpg"]
    assert data.image_sources("celeba:test[1:]", 9, root) == ["000006.jpg"]
    assert load_images("celeba", root).shape == (3, 3, 218, 178)
    assert load_images("celeba:test", root, shape=(3, 64, 64)).shape == (2, 3, 64, 64)
    assert str(data.parse_spec("celeba:valid")) == "celeba:valid"
    with pytest.raises(DataError, match="celeba has no labels"):
        data.load_labels("celeba", root)
    with pytest.raises(DataError, match="use celeba:train or celeba:valid or celeba:test"):
        load_images("celeba:val", root)
    (root / releases.CELEBA_PARTITION).write_text("000001.jpg train\n")
    with pytest.raises(DataError, match="line 1 of .*list_eval_partition.txt is not 'NAME.jpg 0|1|2'"):
        load_images("celeba", root)


@pytest.mark.parametrize("order", ["<", ">"])
def test_mat_reader_casts_matlab_storage_to_the_class(tmp_path, order):
    """MATLAB stores a double matrix of small integers as bytes (SVHN's y) and packs a short name in a small element;
    a big-endian file says MI. Written here by hand, checked against scipy.io.loadmat(mat_dtype=True)."""
    import scipy.io

    from dgmood.data.matfile import read_mat

    def element(kind, data):
        return struct.pack(order + "II", kind, len(data)) + data + b"\0" * (-len(data) % 8)

    values = np.array([10, 1, 7], np.uint8)
    body = (element(6, struct.pack(order + "II", 6, 0))  # array flags: mxDOUBLE_CLASS
            + element(5, struct.pack(order + "ii", 3, 1))  # dimensions (3, 1)
            + struct.pack(order + "HH", 1, 1) + b"y\0\0\0"  # small element: miINT8 name "y"
            + element(2, values.tobytes()))  # real part stored as miUINT8
    header = b"MATLAB 5.0 MAT-file, hand-made".ljust(116) + b"\0" * 8 + struct.pack(order + "H", 0x0100) + \
        (b"IM" if order == "<" else b"MI")
    (tmp_path / "h.mat").write_bytes(header + element(14, body))
    got = read_mat(tmp_path / "h.mat")["y"]
    reference = scipy.io.loadmat(tmp_path / "h.mat", mat_dtype=True)["y"]
    assert got.dtype == np.float64 and got.shape == (3, 1) and got.ravel().tolist() == [10.0, 1.0, 7.0]
    np.testing.assert_array_equal(got, reference)
