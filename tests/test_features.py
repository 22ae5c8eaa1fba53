"""Tests for dgmood.statistics.score_norms: score norms against the exact Gaussian score, and the feature cache."""

import json

import numpy as np
import pytest
import torch

from dgmood.statistics.score_norms import FeatureCache, FeatureSet, column_names, score_norms
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.models.noise import geometric_sigmas

M, S = 0.5, 0.2
SHAPE = (1, 6, 5)



class GaussianScaledScore:
    """Exact σ·s(x, σ) = σ·(−(x − M)/(S² + σ²)) of pixels i.i.d. N(M, S²); counts its calls."""

    def __init__(self):
        self.calls = 0

    def scaled_score(self, x, sigma):
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        sig = sigma.to(x.dtype)[:, None, None, None]
        return sig * (-(x - M) / (S**2 + sig**2))


def _images(n=9, seed=0):
    return np.random.default_rng(seed).random((n, *SHAPE)).astype(np.float32)


def _expected(images, sigmas):
    dist = np.linalg.norm((images.astype(np.float64) - M).reshape(len(images), -1), axis=1)
    sig = np.asarray(sigmas, dtype=np.float64)
    return sig[None, :] * dist[:, None] / (S**2 + sig[None, :] ** 2)


# --- score_norms -----------------------------------------------------------------------------


def test_score_norms_match_exact_gaussian():
    images, sigmas = _images(), geometric_sigmas()
    f = score_norms(GaussianScaledScore(), images, sigmas)
    assert f.shape == (len(images), len(sigmas)) and f.dtype == np.float32
    np.testing.assert_allclose(f, _expected(images, sigmas), rtol=1e-5)


def test_score_norm_columns_follow_sigma_order():
    images = _images()
    sigmas = [0.3, 1.0, 0.01, 0.1]  # deliberately unsorted
    f = score_norms(GaussianScaledScore(), images, sigmas)
    np.testing.assert_allclose(f, _expected(images, sigmas), rtol=1e-5)
    # permuting the σ list permutes the columns the same way
    perm = [2, 0, 3, 1]
    np.testing.assert_array_equal(score_norms(GaussianScaledScore(), images, np.array(sigmas)[perm]), f[:, perm])


def test_score_norms_accepts_torch_input():
    images, sigmas = _images(), [0.5, 0.05]
    np.testing.assert_array_equal(
        score_norms(GaussianScaledScore(), torch.from_numpy(images), sigmas),
        score_norms(GaussianScaledScore(), images, sigmas),
    )


@pytest.mark.parametrize("batch_size", [1, 4, 9, 500])
def test_score_norms_batch_size_invariant_exact(batch_size):
    images, sigmas = _images(), geometric_sigmas(1.0, 0.01, 4)
    model = GaussianScaledScore()
    f = score_norms(model, images, sigmas, batch_size=batch_size)
    np.testing.assert_array_equal(f, score_norms(GaussianScaledScore(), images, sigmas, batch_size=500))
    assert model.calls == -(-len(images) // batch_size) * len(sigmas)


def test_score_norms_batch_size_invariant_network():
    torch.manual_seed(0)
    net = ScoreNet(NetConfig(image_shape=SHAPE, channels=(8, 16), emb_dim=8)).eval()
    torch.nn.init.normal_(net.head[-1].weight, std=0.1)  # the head starts at zero; make the output non-trivial
    images, sigmas = _images(), [1.0, 0.1, 0.01]
    a = score_norms(net, images, sigmas, batch_size=500)
    b = score_norms(net, images, sigmas, batch_size=2)
    assert np.all(a > 0)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_column_names():
    names = column_names(geometric_sigmas())
    assert names[0] == "score_norm@sigma=1"
    assert names[1] == "score_norm@sigma=0.5995"
    assert names[-1] == "score_norm@sigma=0.01"
    assert len(set(names)) == 10
    assert column_names([0.25]) == ["score_norm@sigma=0.25"]


# --- FeatureCache ----------------------------------------------------------------------------


def test_cache_round_trip_without_pickle(tmp_path):
    sigmas = geometric_sigmas()
    values = np.random.default_rng(0).random((7, 10)).astype(np.float32)
    cache = FeatureCache(tmp_path, "sha-a")
    saved = cache.save("fashion-mnist:test", sigmas, values, seconds=1.5)
    path = cache.path("fashion-mnist:test", sigmas)
    assert path.is_file() and path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    with np.load(path, allow_pickle=False) as f:
        assert set(f.files) == {"values", "meta"}
        np.testing.assert_array_equal(f["values"], values)
        meta = json.loads(str(f["meta"]))
    assert meta["model_sha256"] == "sha-a" and meta["n"] == 7 and meta["seconds"] == 1.5
    np.testing.assert_allclose(meta["sigmas"], sigmas, rtol=1e-15)

    loaded = FeatureCache(tmp_path, "sha-a").load("fashion-mnist:test", sigmas)
    assert isinstance(loaded, FeatureSet)
    np.testing.assert_array_equal(loaded.values, values)
    assert loaded.values.dtype == np.float32
    assert loaded.columns == column_names(sigmas) == saved.columns
    assert loaded.meta == saved.meta


def test_cache_misses_on_other_model_grid_or_dataset(tmp_path):
    sigmas = geometric_sigmas()
    FeatureCache(tmp_path, "sha-a").save("ds", sigmas, np.ones((3, 10), np.float32))
    assert FeatureCache(tmp_path, "sha-a").load("ds", sigmas) is not None
    assert FeatureCache(tmp_path, "sha-b").load("ds", sigmas) is None
    assert FeatureCache(tmp_path, "sha-a").load("ds", geometric_sigmas(n=5)) is None
    assert FeatureCache(tmp_path, "sha-a").load("ds", geometric_sigmas(2.0, 0.01, 10)) is None
    assert FeatureCache(tmp_path, "sha-a").load("other", sigmas) is None


def test_cache_computes_each_sigma_level_once_across_grids(tmp_path):
    # the combined detector's five levels are every other one of MSMA's ten: whichever grid comes first,
    # the other reads the levels it shares and computes only the rest
    model, images = GaussianScaledScore(), _images()
    full = geometric_sigmas()
    cache = FeatureCache(tmp_path, "sha-a")
    half = cache.get("ds", full[::2], lambda: images, model, batch_size=4, progress=False)
    calls = model.calls
    both = cache.get("ds", full, lambda: images, model, batch_size=4, progress=False)
    assert model.calls - calls == calls  # five new levels, as many calls as the first five took
    np.testing.assert_allclose(both.values, _expected(images, full), rtol=1e-5)
    np.testing.assert_array_equal(both.values[:, ::2], half.values)
    assert both.meta["levels_computed"] == 5
    calls = model.calls
    odd = cache.get("ds", full[1::2], lambda: pytest.fail("no images needed"), model, batch_size=4, progress=False)
    assert model.calls == calls and odd.meta["levels_computed"] == 0
    np.testing.assert_array_equal(odd.values, both.values[:, 1::2])
    assert FeatureCache(tmp_path, "sha-b").get("ds", full[:1], lambda: images, model, batch_size=4,
                                               progress=False).meta["levels_computed"] == 1  # another model


def test_cache_checks_meta_not_only_file_name(tmp_path):
    # a file for model A sitting at model B's path must not be served as B's features
    sigmas = [1.0, 0.1]
    a, b = FeatureCache(tmp_path, "sha-a"), FeatureCache(tmp_path, "sha-b")
    a.save("ds", sigmas, np.ones((3, 2), np.float32))
    b.path("ds", sigmas).write_bytes(a.path("ds", sigmas).read_bytes())
    assert b.load("ds", sigmas) is None


def test_cache_get_computes_only_on_miss(tmp_path):
    images, sigmas = _images(), geometric_sigmas(1.0, 0.01, 3)
    calls = []

    def images_fn():
        calls.append(1)
        return images

    model = GaussianScaledScore()
    cache = FeatureCache(tmp_path, "sha-a")
    first = cache.get("ds", sigmas, images_fn, model, progress=False)
    assert len(calls) == 1 and model.calls == 3
    np.testing.assert_allclose(first.values, _expected(images, sigmas), rtol=1e-5)
    assert first.meta["seconds"] >= 0 and first.meta["n"] == len(images)

    second = cache.get("ds", sigmas, images_fn, model, progress=False)
    assert len(calls) == 1 and model.calls == 3  # served from disk
    np.testing.assert_array_equal(second.values, first.values)

    cache.get("ds", [0.5], images_fn, model, progress=False)  # other grid: a miss
    assert len(calls) == 2
    FeatureCache(tmp_path, "sha-b").get("ds", sigmas, images_fn, model, progress=False)  # other model
    assert len(calls) == 3


def test_cache_corrupt_file_is_recomputed_and_replaced(tmp_path):
    sigmas = [1.0, 0.1]
    cache = FeatureCache(tmp_path, "sha-a")
    cache.path("ds", sigmas).write_bytes(b"this is not an npz file" * 10)
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert cache.load("ds", sigmas) is None
    cache.path("ds", sigmas).write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="damaged"):
        got = cache.get("ds", sigmas, lambda: _images(), GaussianScaledScore(), progress=False)
    np.testing.assert_allclose(got.values, _expected(_images(), sigmas), rtol=1e-5)
    assert cache.load("ds", sigmas) is not None  # replaced


def test_cache_truncated_file_warns_and_misses(tmp_path):
    sigmas = [1.0, 0.1]
    cache = FeatureCache(tmp_path, "sha-a")
    cache.save("ds", sigmas, np.ones((3, 2), np.float32))
    path = cache.path("ds", sigmas)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an .npz cut short: still starts with the zip magic
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert cache.load("ds", sigmas) is None
