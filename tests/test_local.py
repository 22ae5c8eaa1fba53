"""The local statistic (eq. L1, issue 28): peak window means, window sides, and a defect found by its window."""

import numpy as np
import pytest

from dgmood.statistics.base import statistic_from_dict
from dgmood.statistics.local import LocalField, peak_window_mean, window_sides


def test_peak_window_mean_matches_brute_force():
    e = np.random.default_rng(0).random((3, 9, 11))
    for side in (1, 2, 4, 9):
        brute = [max(img[r:r + side, c:c + side].mean() for r in range(9 - side + 1) for c in range(11 - side + 1))
                 for img in e]
        np.testing.assert_allclose(peak_window_mean(e, side), brute, rtol=1e-12)


def test_window_sides_scale_with_the_image():
    assert window_sides(28, 28) == [4, 8]
    assert window_sides(32, 32) == [5, 9]
    assert window_sides(4, 64) == [2, 2]  # at least 2 pixels, never more than the shorter side
    assert window_sides(3, 3, (1.0, 2.0)) == [3, 3]


class PixelField:
    """A stand-in score network: σ·s(x, σ) = x − 0.5, so each pixel's score norm is its distance from mid-grey."""

    def scaled_score(self, x, sigma):
        return x - 0.5


def test_a_small_defect_raises_the_peak_more_than_the_whole_image_energy():
    rng = np.random.default_rng(1)
    train = (0.5 + 0.1 * rng.standard_normal((400, 1, 28, 28))).astype(np.float32)
    test = (0.5 + 0.1 * rng.standard_normal((200, 1, 28, 28))).astype(np.float32)
    patched = test.copy()
    patched[:, :, 10:16, 10:16] = rng.random((200, 1, 6, 6))  # a 6 × 6 noise patch: 4.6 % of the image
    stat = LocalField(sigmas=(0.1, 0.01), batch_size=64).fit(PixelField(), train)
    clean, defect = stat.compute(PixelField(), test), stat.compute(PixelField(), patched)
    assert clean.shape == (200, 2) and np.isfinite(clean).all()
    # a window inside the patch: the peak separates patched from clean images, the whole-image mean does not
    from dgmood.evaluation.metrics import auroc

    whole = lambda x: np.log(np.maximum(np.abs(x - 0.5), 1e-3)).mean(axis=(1, 2, 3))  # noqa: E731
    assert auroc(-clean[:, 0], -defect[:, 0]) > 0.95 and auroc(-clean[:, 1], -defect[:, 1]) > 0.98  # 0.974, 0.994
    assert auroc(-whole(test), -whole(patched)) < 0.9  # the same field summed over the image: 0.865
    # the state travels: a loaded copy gives the same values
    copy = statistic_from_dict(stat.to_dict())
    copy.set_state(*stat.state())
    np.testing.assert_allclose(copy.compute(PixelField(), test), clean)


def test_unfitted_local_field_says_what_to_do():
    with pytest.raises(ValueError, match="not fitted"):
        LocalField().compute(PixelField(), np.zeros((1, 1, 8, 8), np.float32))


def test_shares_the_score_norm_passes():
    assert LocalField(sigmas=(1.0, 0.1)).shared_sigmas == (1.0, 0.1)
