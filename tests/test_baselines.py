"""Tests for dgmood.statistics.complexity: compressed sizes against direct and hand-built encodings, the entropy
bound, bit-exact round trips, the minimum over codecs, perturbation statistics, errors."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dgmood.statistics.complexity import (
    CODECS,
    DEFAULT_MU,
    JPEG2000_MAX_RESOLUTIONS,
    PNG_STRATEGIES,
    available_codecs,
    complexity_score,
    compressed_bits_per_dim,
    likelihood_ratio,
    perturb,
    png_sizes,
)
from dgmood.data.datasets import load_images


def _noise(n, c=1, size=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size)).astype(np.uint8)


def _smooth(size=28):
    """A 2-D Gaussian bump: JPEG2000's wavelet codes it smaller than PNG does."""
    yy, xx = np.mgrid[:size, :size] / size
    return np.rint(255 * np.exp(-((xx - 0.4) ** 2 + (yy - 0.6) ** 2) / 0.1)).astype(np.uint8)[None, None]


def _pillow_bytes(a, fmt, **options):
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, fmt, **options)
    return buffer.getvalue()


def _handmade_png(a):
    """A greyscale PNG built from the specification with the standard library: filter type 0 on
    every row, zlib level 9 (Pillow only reads it back, as a check that it is a valid PNG)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = a.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def fmnist(data_dir):
    return load_images("fashion-mnist:test[:60]", data_dir=data_dir)


# --- sizes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["png", "jpeg2000"])
@pytest.mark.parametrize("channels", [1, 3])
def test_entropy_bound_and_constant(codec, channels):
    # Uniform 8-bit noise has 8 bits/dim of entropy: no lossless code can average below it.
    noise = compressed_bits_per_dim(_noise(20, channels), codec)
    assert noise.shape == (20,) and noise.dtype == np.float64
    assert noise.mean() > 8.0 and noise.min() > 7.5
    # A constant image costs little more than the file headers.
    const = compressed_bits_per_dim(np.full((3, channels, 28, 28), 0.3, np.float32), codec)
    assert np.all(const == const[0])
    assert const[0] < (1.0 if codec == "png" else 1.5)  # JPEG2000's main header alone is ~1.2 bits/dim here


def test_minimum_over_codecs_below_one_and_above_seven():
    assert compressed_bits_per_dim(np.zeros((2, 1, 28, 28)))[0] < 1.0
    assert compressed_bits_per_dim(_noise(5)).min() > 7.0


def test_png_matches_pillow_directly():
    images = np.concatenate([_noise(2), _smooth(), np.full((1, 1, 28, 28), 200, np.uint8)])
    expected = [
        min(len(_pillow_bytes(a[0], "PNG", compress_level=9, compress_type=s)) for s in range(5)) * 8 / 784
        for a in images
    ]
    np.testing.assert_array_equal(compressed_bits_per_dim(images, "png"), expected)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (5, 17, 3), (1, 1, 1), (300, 256, 1)],
                         ids=["mnist-like", "rgb", "odd-rgb", "one-pixel", "several-idat-chunks"])
def test_png_sizes_equal_pillow_on_noise_ramps_and_constants(shape):
    # the vectorised filter choice + zlib against Pillow's own encoder, byte for byte (the 300 × 256 noise image
    # deflates to more than 64 KiB: Pillow writes it as two IDAT chunks)
    rng = np.random.default_rng(sum(shape))
    images = np.concatenate([rng.integers(0, 256, (2, *shape)), np.full((1, *shape), 77),
                             np.cumsum(rng.integers(0, 3, (2, *shape)), axis=1) % 256]).astype(np.uint8)
    expected = [min(len(_pillow_bytes(a[..., 0] if a.shape[-1] == 1 else a, "PNG", compress_level=9, compress_type=s))
                    for s in range(5)) for a in images]
    np.testing.assert_array_equal(png_sizes(images, threads=1), expected)
    np.testing.assert_array_equal(png_sizes(images, threads=3), expected)  # deflated by a pool: the same, in order


def test_png_sizes_equal_pillow_on_real_images(data_dir):
    for spec in ("fashion-mnist:test[:300]", "mnist:test[:300]"):
        images = load_images(spec, data_dir=data_dir)
        levels = np.rint(images * 255).astype(np.uint8)
        expected = [min(len(_pillow_bytes(a[0], "PNG", compress_level=9, compress_type=s)) for s in range(5))
                    for a in levels]
        np.testing.assert_array_equal(png_sizes(levels.transpose(0, 2, 3, 1)), expected)
        np.testing.assert_array_equal(compressed_bits_per_dim(images, "png"),
                                      compressed_bits_per_dim(images, "png", verify=True))


def test_png_close_to_handmade_png(fmnist):
    # Same 784 bytes, same 57 bytes of chunks, same deflate level: Pillow's filters and strategies
    # can only differ modestly from the plain filter-0 stream (on these 60 images: 0.88–1.14, mean
    # 0.98; Pillow chooses the row filters itself and sometimes chooses worse than none).
    levels = np.rint(fmnist[:, 0] * 255).astype(np.uint8)
    handmade = []
    for a in levels:
        data = _handmade_png(a)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), a)
        handmade.append(len(data) * 8 / a.size)
    ours = compressed_bits_per_dim(fmnist, "png")
    ratio = ours / np.array(handmade)
    assert 0.8 < ratio.min() and ratio.max() < 1.2 and ratio.mean() < 1.0


def test_jpeg2000_matches_pillow_directly():
    images = np.concatenate([_noise(2), _smooth()])
    expected = [
        min(
            len(_pillow_bytes(a[0], "JPEG2000", no_jp2=True, irreversible=False, num_resolutions=r))
            for r in range(1, 6)  # 2**4 <= 28 < 2**5: five levels fit a 28×28 image
        )
        * 8
        / 784
        for a in images
    ]
    np.testing.assert_array_equal(compressed_bits_per_dim(images, "jpeg2000"), expected)


def test_minimum_over_codecs():
    images = np.concatenate([_smooth(), np.full((1, 1, 28, 28), 90, np.uint8), _noise(3)])
    png = compressed_bits_per_dim(images, "png")
    jp2 = compressed_bits_per_dim(images, ["jpeg2000"])
    both = compressed_bits_per_dim(images, ("png", "jpeg2000"))
    np.testing.assert_array_equal(both, np.minimum(png, jp2))
    assert jp2[0] < png[0] and png[1] < jp2[1]  # each codec wins somewhere
    np.testing.assert_array_equal(compressed_bits_per_dim(images, ("jpeg2000", "png", "png")), both)


def test_complexity_statistic_uses_its_codecs_and_the_combined_detector_png():
    from dgmood.methods.recipes import MethodConfig, build_detector
    from dgmood.models.network import NetConfig, ScoreNet
    from dgmood.statistics.complexity import Complexity

    images = np.concatenate([_smooth(), _noise(2)]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(Complexity(("png",)).compute(None, images), compressed_bits_per_dim(images, "png"))
    np.testing.assert_array_equal(Complexity().compute(None, images),
                                  compressed_bits_per_dim(images, ("png", "jpeg2000")))
    detector = build_detector("combined", ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8,))), "score",
                              MethodConfig())
    stat = next(s for s in detector.statistics if isinstance(s, Complexity))
    assert stat.codecs == ("png",) and stat.cache_settings() == {"codecs": ["png"]}


def test_float_torch_and_uint8_agree():
    levels = _noise(3, 3)
    floats = levels.astype(np.float32) / 255
    a = compressed_bits_per_dim(levels)
    np.testing.assert_array_equal(a, compressed_bits_per_dim(floats))
    np.testing.assert_array_equal(a, compressed_bits_per_dim(torch.from_numpy(floats)))
    # Values between levels round to the nearest one.
    np.testing.assert_array_equal(a, compressed_bits_per_dim(np.clip(floats + 0.4 / 255, 0, 1)))


def test_fashion_mnist(fmnist):
    # Measured on the first 1000 test images (PNG alone and the PNG/JPEG2000 minimum agree):
    # FashionMNIST 5.11 bits/dim, MNIST 2.68 — MNIST is "simpler", the reason likelihoods rank it
    # as more in-distribution (not asserted: MNIST is OOD data and tunes nothing here).
    bpd = compressed_bits_per_dim(fmnist, verify=True)
    assert bpd.shape == (60,)
    assert np.all((bpd > 1) & (bpd < 9.5))
    assert 4 < bpd.mean() < 6.5


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_pillow_jpeg2000_lossless_round_trip(channels, fmnist):
    images = [np.rint(fmnist[i, 0] * 255).astype(np.uint8) for i in range(3)]
    images += [a.transpose(1, 2, 0) if channels == 3 else a[0] for a in _noise(2, channels)]
    images.append(_smooth()[0, 0])
    for a in images:
        if channels == 3 and a.ndim == 2:
            a = np.stack([a, a[::-1], a.T], axis=-1)
        for r in range(1, 6):
            for mct in (0, 1) if channels == 3 else (0,):
                data = _pillow_bytes(a, "JPEG2000", no_jp2=True, irreversible=False, num_resolutions=r, mct=mct)
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), a), (r, mct)


@pytest.mark.parametrize("channels", [1, 3])
def test_pillow_png_lossless_round_trip(channels):
    for a in _noise(2, channels):
        a = a.transpose(1, 2, 0) if channels == 3 else a[0]
        for s in PNG_STRATEGIES:
            data = _pillow_bytes(a, "PNG", compress_level=9, compress_type=s)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), a)


@pytest.mark.parametrize("channels", [1, 3])
def test_verify_passes(channels):
    images = np.concatenate([_noise(2, channels), np.repeat(_smooth(), channels, axis=1)])
    np.testing.assert_array_equal(
        compressed_bits_per_dim(images, verify=True), compressed_bits_per_dim(images, verify=False)
    )


def test_verify_catches_a_lossy_encoder(monkeypatch):
    import dgmood.statistics.complexity as baselines

    def _lossy(image):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=50)
        return buffer.getvalue()

    monkeypatch.setitem(baselines._ENCODERS, "png", _lossy)
    compressed_bits_per_dim(_noise(1), "png")  # no check, no error
    with pytest.raises(RuntimeError, match="round-trip"):
        compressed_bits_per_dim(_noise(1), "png", verify=True)


def test_small_images():
    # A 1×1 image allows one JPEG2000 resolution level; 64×64 is capped at the maximum tried.
    assert compressed_bits_per_dim(np.zeros((1, 1, 1, 1)), verify=True).shape == (1,)
    assert JPEG2000_MAX_RESOLUTIONS == 6
    assert compressed_bits_per_dim(_noise(1, size=64), "jpeg2000", verify=True)[0] > 8


def test_jpegxl():
    pytest.importorskip("pillow_jxl")
    assert "jpegxl" in available_codecs()
    noise = compressed_bits_per_dim(_noise(5), "jpegxl", verify=True)
    assert noise.mean() > 8.0
    const = compressed_bits_per_dim(np.full((2, 3, 28, 28), 0.3), "jpegxl", verify=True)
    assert const[0] < 1.0


# --- complexity score, likelihood ratio ---------------------------------------------------------------------------


def test_complexity_score():
    bpd = np.array([3.0, 3.0, 6.0])
    images = np.concatenate([np.zeros((1, 1, 28, 28), np.uint8), _noise(2)])
    complexity = compressed_bits_per_dim(images)
    score = complexity_score(bpd, complexity)
    np.testing.assert_allclose(score, bpd - complexity)
    # Same likelihood: the simpler image is the more surprising one (higher S = more OOD).
    assert score[0] > score[1]
    np.testing.assert_allclose(complexity_score(torch.tensor(bpd), torch.tensor(complexity)), score)


def test_likelihood_ratio():
    a, b = np.array([-10.0, -20.0]), np.array([-12.0, -15.0])
    out = likelihood_ratio(a, b)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [2.0, -5.0])
    np.testing.assert_allclose(likelihood_ratio(torch.tensor(a), torch.tensor(b)), out)


@pytest.mark.parametrize(
    "fn, a, b, match",
    [
        (likelihood_ratio, np.zeros(3), np.zeros(4), "differ in shape"),
        (likelihood_ratio, np.zeros((3, 1)), np.zeros((3, 1)), r"shape \(N,\)"),
        (likelihood_ratio, np.array([0.0, np.nan]), np.zeros(2), "NaN"),
        (complexity_score, np.zeros(2), np.array([1.0, np.inf]), "complexity_bpd contains NaN or inf"),
    ],
)
def test_score_errors(fn, a, b, match):
    with pytest.raises(ValueError, match=match):
        fn(a, b)


# --- perturbation -------------------------------------------------------------------------------------------------


def _binomial_ok(count, n, p, sds=5.0):
    return abs(count - n * p) <= sds * np.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("mu", [0.05, DEFAULT_MU, 0.5])
def test_perturb_rate_and_untouched(mu):
    # 0.3 is not one of the levels k/255, so every replaced pixel visibly changes.
    x = torch.full((64, 1, 28, 28), 0.3)
    y = perturb(x, mu, torch.Generator().manual_seed(1))
    changed = y != x
    assert _binomial_ok(int(changed.sum()), x.numel(), mu)
    assert torch.all(y[~changed] == 0.3)
    assert torch.all(x == 0.3)  # the input is not modified
    levels = y[changed] * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_perturb_uniform_levels():
    y = perturb(torch.full((400, 1, 28, 28), 0.3), 1.0, torch.Generator().manual_seed(2))
    counts = np.bincount(torch.round(y * 255).long().flatten().numpy(), minlength=256)
    assert counts.shape == (256,)
    expected = y.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 255 + 6 * np.sqrt(2 * 255)  # chi-square, 255 degrees of freedom, ~6 sd


def test_perturb_channels_together():
    x = torch.full((32, 3, 28, 28), 0.3, dtype=torch.float64)
    y = perturb(x, 0.2, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and y.dtype == torch.float64
    changed = y != x
    per_pixel = changed.any(dim=1)
    assert torch.equal(per_pixel, changed.all(dim=1))  # all channels of a pixel, or none
    assert _binomial_ok(int(per_pixel.sum()), per_pixel.numel(), 0.2)


def test_perturb_eight_bit_images():
    # On 8-bit data a replacement keeps the old value with probability 1/256.
    x = torch.from_numpy(_noise(64).astype(np.float32) / 255)
    y = perturb(x, 0.3, torch.Generator().manual_seed(4))
    assert _binomial_ok(int((y != x).sum()), x.numel(), 0.3 * 255 / 256)


def test_perturb_determinism_and_extremes():
    x = torch.rand(8, 1, 28, 28)
    a = perturb(x, 0.2, torch.Generator().manual_seed(5))
    assert torch.equal(a, perturb(x, 0.2, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, perturb(x, 0.2, torch.Generator().manual_seed(6)))
    assert torch.equal(perturb(x, 0.0, torch.Generator().manual_seed(5)), x)
    assert torch.all(perturb(torch.full_like(x, 0.3), 1, torch.Generator().manual_seed(5)) != 0.3)
    assert perturb(x, 0.2).shape == x.shape  # global generator


@pytest.mark.parametrize(
    "images, mu, match",
    [
        (torch.zeros(1, 28, 28), 0.1, r"shape \(N, C, H, W\)"),
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 0.1, "floating-point"),
        (np.zeros((1, 1, 28, 28)), 0.1, "tensor"),
        (torch.zeros(1, 1, 28, 28), 1.5, "mu must be"),
        (torch.zeros(1, 1, 28, 28), -0.1, "mu must be"),
        (torch.zeros(1, 1, 28, 28), float("nan"), "mu must be"),
        (torch.zeros(1, 1, 28, 28), True, "mu must be"),
    ],
)
def test_perturb_errors(images, mu, match):
    with pytest.raises(ValueError, match=match):
        perturb(images, mu)


def test_default_mu_in_papers_range():
    assert 0.1 <= DEFAULT_MU <= 0.2


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, codecs, match",
    [
        (np.zeros((1, 28, 28)), ("png",), r"shape \(N, C, H, W\)"),
        (np.zeros((1, 2, 28, 28)), ("png",), "C = 1 or 3"),
        (np.zeros((0, 1, 28, 28)), ("png",), "empty"),
        (np.zeros((1, 1, 0, 28)), ("png",), "empty"),
        (np.full((1, 1, 4, 4), np.nan), ("png",), "NaN"),
        (np.full((1, 1, 4, 4), 1.5), ("png",), r"\[0, 1\]"),
        (np.full((1, 1, 4, 4), -0.1), ("png",), r"\[0, 1\]"),
        (np.full((1, 1, 4, 4), 255, np.int64), ("png",), "pass uint8"),
        (np.zeros((1, 1, 4, 4), bool), ("png",), "dtype bool"),
        (np.zeros((1, 1, 4, 4)), ("gif",), "unknown codec 'gif'"),
        (np.zeros((1, 1, 4, 4)), (), "codecs is empty"),
    ],
)
def test_complexity_errors(images, codecs, match):
    with pytest.raises(ValueError, match=match) as info:
        compressed_bits_per_dim(images, codecs)
    assert "\n" not in str(info.value)


def test_jpegxl_missing_is_a_clear_error(monkeypatch):
    import dgmood.statistics.complexity as baselines

    monkeypatch.setattr(baselines, "_has_jxl", lambda: False)
    assert available_codecs() == ("png", "jpeg2000")
    assert set(available_codecs()) < set(CODECS)
    with pytest.raises(ValueError, match="pillow-jxl-plugin"):
        compressed_bits_per_dim(np.zeros((1, 1, 4, 4)), ("png", "jpegxl"))
