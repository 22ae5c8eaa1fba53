"""The local residual against the nearest training images (eqs. L2–L3, issue 28) and the k-NN statistic's second
reading."""

import numpy as np
import pytest

from dgmood.statistics.base import statistic_from_dict
from dgmood.statistics.knn import PixelKNN
from dgmood.statistics.residual import peak_residual, residual_map


def _brute_map(x, nb, patch, shift):
    """Eq. L2 written out: per pixel, the least patch mean over neighbours and shifts (edges repeated)."""
    _, c, h, w = x.shape
    half = patch // 2
    out = np.full((len(x), h, w), np.inf)
    for i in range(len(x)):
        for k in range(nb.shape[1]):
            for dy in range(-shift, shift + 1):
                for dx in range(-shift, shift + 1):
                    rows = np.clip(np.arange(h) + dy, 0, h - 1)
                    cols = np.clip(np.arange(w) + dx, 0, w - 1)
                    moved = nb[i, k][:, rows][:, :, cols]
                    sq = ((x[i] - moved) ** 2).sum(axis=0)
                    for r in range(h):
                        for q in range(w):
                            win = sq[max(0, r - half):r + half + 1, max(0, q - half):q + half + 1]
                            out[i, r, q] = min(out[i, r, q], win.mean())
    return out


@pytest.mark.parametrize("patch,shift", [(3, 1), (5, 0), (1, 2)])
def test_residual_map_matches_the_equation_written_out(patch, shift):
    rng = np.random.default_rng(0)
    x = rng.random((2, 2, 7, 6)).astype(np.float32)
    nb = rng.random((2, 3, 2, 7, 6)).astype(np.float32)
    got = residual_map(x, nb, patch, shift).numpy()
    np.testing.assert_allclose(got, _brute_map(x, nb, patch, shift), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(peak_residual(x, nb, patch, shift), got.reshape(2, -1).max(axis=1), rtol=1e-6)


def test_each_part_takes_its_best_neighbour_and_a_shift_explains_a_moved_one():
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 1, 12, 12)).astype(np.float32)
    mixed = a.copy()
    mixed[:, :, 6:] = b[:, :, 6:]  # left half from one neighbour, right half from the other
    assert residual_map(mixed[None], np.stack([a, b])[None], 3, 0).numpy()[0, :, :4].max() == 0.0
    assert residual_map(mixed[None], np.stack([a, b])[None], 3, 0).numpy()[0, :, 8:].max() == 0.0
    moved = np.roll(a, 1, axis=2)  # a neighbour one pixel to the side: explained once shifts are allowed
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert residual_map(moved[None], a[None, None], 3, 1).numpy()[0][inner[1:]].max() < 1e-12
    assert residual_map(moved[None], a[None, None], 3, 0).numpy()[0][inner[1:]].max() > 0.01


def _blobs(n, rng):
    """Smooth random grey images: training-like images with ordinary variation."""
    from scipy.ndimage import gaussian_filter

    return np.clip(gaussian_filter(rng.random((n, 1, 16, 16)), (0, 0, 2, 2)) * 3 - 1, 0, 1).astype(np.float32)


def test_pixel_knn_reads_the_local_residual_from_the_same_search():
    rng = np.random.default_rng(2)
    train, test = _blobs(600, rng), _blobs(200, rng)
    patched = test.copy()
    patched[:, :, 5:9, 6:10] = rng.random((200, 1, 4, 4))  # a 4 × 4 noise patch: 6 % of the image
    plain, local = PixelKNN(k=5).fit(None, train), PixelKNN(k=5, local_k=10).fit(None, train)
    both = local.compute(None, test)
    assert both.shape == (200, 2) and local.columns(2) == ["knn-local", "knn"]
    np.testing.assert_allclose(both[:, 1], plain.compute(None, test), rtol=1e-12)  # the distance is unchanged
    from dgmood.evaluation.metrics import auroc

    defect = local.compute(None, patched)
    # the residual finds the patch; the whole-image distance to the 5th neighbour hardly does
    assert auroc(-both[:, 0], -defect[:, 0]) > 0.99
    assert auroc(-both[:, 1], -defect[:, 1]) < auroc(-both[:, 0], -defect[:, 0]) - 0.1
    # training images leave themselves out: no zero residual, values like unseen images'
    own = local.compute_training(None, train[:200])
    assert own[:, 0].min() > 0 and 0.5 < np.median(own[:, 0]) / np.median(both[:, 0]) < 2
    np.testing.assert_allclose(own[:, 1], plain.compute_training(None, train[:200]), rtol=1e-12)
    copy = statistic_from_dict(local.to_dict())  # the settings travel with a saved detector
    copy.set_state(*local.state())
    np.testing.assert_allclose(copy.compute(None, test), both)
    assert "local_k" not in plain.cache_settings() and local.cache_settings()["local_k"] == 10


def test_bad_residual_settings_say_what_to_do():
    with pytest.raises(ValueError, match="patch must be odd"):
        PixelKNN(local_k=3, patch=4).fit(None, np.zeros((10, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="needs at least 10"):
        PixelKNN(k=5, local_k=10).fit(None, np.zeros((9, 1, 4, 4), np.float32)).compute(
            None, np.zeros((1, 1, 4, 4), np.float32))


def test_the_combined_recipe_averages_the_residual_into_the_raw_pixel_term():
    from dgmood.methods.recipes import MethodConfig, build_detector
    from dgmood.models.network import NetConfig, ScoreNet

    model = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8,)))
    plain, local = (build_detector("combined", model, "score", MethodConfig(knn_local=k)) for k in (0, 10))
    assert plain.estimator.distance_columns == 1 and plain.statistics[-1].local_k == 0
    assert local.estimator.distance_columns == 2 and local.statistics[-1].local_k == 10
    assert plain.estimator.hinge_columns == local.estimator.hinge_columns  # the orientation term only
    with pytest.raises(ValueError, match="knn_local must be >= 0"):
        MethodConfig(knn_local=-1)
    # the default since 2026-12-08; 0 is not written, so detectors saved before the residual existed still match
    assert MethodConfig().knn_local == 10 and MethodConfig().to_dict()["knn_local"] == 10
    assert "knn_local" not in MethodConfig(knn_local=0).to_dict()
