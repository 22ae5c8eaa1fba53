"""The orientation statistic (eq. O1): symmetries, pooling, leave-one-out, and flipped images found on real data."""

import numpy as np
import pytest

from dgmood.evaluation.metrics import auroc
from dgmood.statistics.orientation import Orientation, mirror_symmetries, pooled, symmetries


def test_symmetries_of_square_and_rectangular_images():
    x = np.random.default_rng(0).random((2, 1, 5, 5))
    turns = symmetries(5, 5)
    images = [g(x) for g in turns.values()]
    assert len(turns) == 7 and all(im.shape == x.shape for im in images)
    distinct = {np.ascontiguousarray(im).tobytes() for im in images} | {x.tobytes()}
    assert len(distinct) == 8  # the dihedral group of the square: 8 different images of a generic one
    np.testing.assert_array_equal(turns["rot90"](turns["rot270"](x)), x)
    np.testing.assert_array_equal(turns["transpose"](x)[0, 0], x[0, 0].T)
    np.testing.assert_array_equal(turns["antitranspose"](x)[0, 0], x[0, 0, ::-1, ::-1].T)
    assert sorted(symmetries(4, 6)) == ["hflip", "rot180", "vflip"]  # a quarter turn would change the shape


def test_pooled_is_the_mean_of_each_block():
    x = np.random.default_rng(1).random((3, 2, 28, 28)).astype(np.float32)
    expected = x.reshape(3, 2, 7, 4, 7, 4).mean(axis=(3, 5)).reshape(3, -1)
    np.testing.assert_allclose(pooled(x, 7), expected, rtol=1e-6)


def test_a_symmetric_training_image_does_not_meet_itself():
    rng = np.random.default_rng(2)
    half = rng.random((40, 1, 28, 14)).astype(np.float32)
    mirror = np.concatenate([half, half[..., ::-1]], axis=-1)  # every image equal to its horizontal flip
    stat = Orientation(max_bank=40).fit(None, mirror)
    own = stat.compute_training(None, mirror)
    # the flip is the image: its distance is the image's own, so the least over the symmetries is at most the
    # image's and O ≥ 0; left out of its own search, the image meets neither itself nor its flip (O stays small,
    # where a zero distance to itself would make it log(d / 1e-6) ≈ 14)
    assert np.isfinite(own).all() and own.min() >= -1e-9 and own.max() < 0.5


def test_flipped_and_rotated_images_score_higher(data_dir):
    from dgmood.data.datasets import load_images

    train = load_images("fashion-mnist:train[:3000]", data_dir=data_dir)
    test = load_images("fashion-mnist:test[:300]", data_dir=data_dir)
    stat = Orientation(max_bank=3000).fit(None, train)
    upright = stat.compute(None, test)
    assert abs(np.median(stat.compute_training(None, train[:300])) - np.median(upright)) < 0.1  # unseen-like
    for name in ("vflip", "rot90", "rot180"):
        turned = stat.compute(None, np.ascontiguousarray(symmetries(28, 28)[name](test)))
        assert auroc(-upright, -turned) > 0.9, name  # measured 0.96-0.99 with this bank


def test_with_mirror_a_mirrored_image_scores_as_the_original_and_flips_are_still_found(data_dir):
    # Eq. O2 on FashionMNIST (clothes are roughly left-right symmetric in distribution, as photographs are):
    # mirroring changes no value, in either search (unseen images, or training images left out of their own).
    from dgmood.data.datasets import load_images

    assert sorted(mirror_symmetries(28, 28)) == ["rot270", "rot90", "vflip"]
    assert sorted(mirror_symmetries(4, 6)) == ["vflip"]
    train = load_images("fashion-mnist:train[:3000]", data_dir=data_dir)
    test = load_images("fashion-mnist:test[:300]", data_dir=data_dir)
    stat = Orientation(max_bank=3000, mirror=True).fit(None, train)
    upright = stat.compute(None, test)
    np.testing.assert_allclose(stat.compute(None, np.ascontiguousarray(test[..., ::-1])), upright, atol=1e-6)
    np.testing.assert_allclose(stat.compute_training(None, np.ascontiguousarray(train[:200, ..., ::-1])),
                               stat.compute_training(None, train[:200]), atol=1e-6)
    for name in ("vflip", "rot90"):
        turned = stat.compute(None, np.ascontiguousarray(symmetries(28, 28)[name](test)))
        assert auroc(-upright, -turned) > 0.9, name


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_bank"):
        Orientation(max_bank=3).fit(None, np.zeros((10, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="not fitted"):
        Orientation().compute(None, np.zeros((2, 1, 8, 8), np.float32))
