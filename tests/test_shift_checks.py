"""The in-distribution-made checks of benchmarks/speed_ablation.py: shifts of test images, no OOD data."""

import numpy as np
import pytest
from speed_ablation import MORE_SHIFTS, OTHER_SHIFTS


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.random((6, 1, 28, 28)).astype(np.float32) * (rng.random((6, 1, 28, 28)) < 0.3)


@pytest.mark.parametrize("name", sorted(MORE_SHIFTS | OTHER_SHIFTS))
def test_every_shift_keeps_shape_and_range_changes_the_images_and_repeats(images, name):
    shift = (MORE_SHIFTS | OTHER_SHIFTS)[name]
    out = shift(images)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, images)
    np.testing.assert_array_equal(shift(images), out)  # seeded: the same check every run


def test_lower_contrast_keeps_each_image_mean_and_shrinks_its_spread(images):
    out = OTHER_SHIFTS["contrast"](images)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 0.7 * images.std(axis=(1, 2, 3)), rtol=1e-5)


def test_occlusion_covers_one_grey_square_per_image(images):
    out = OTHER_SHIFTS["occlude"](images)
    changed = (out != images)[:, 0]
    grey = out[:, 0] == 0.5
    for img_grey, img_changed in zip(grey, changed):
        rows, cols = np.nonzero(img_grey)
        assert img_changed[~img_grey].sum() == 0
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7 and img_grey.sum() == 64
