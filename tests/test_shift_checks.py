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


# --- benchmarks/checks.py: the photograph checks and the local defects (issues 27, 28) ---------------------------


@pytest.fixture(scope="module")
def photos():
    """Smooth random colour images (a JPEG round trip of noise would be all artefact)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    return np.clip(gaussian_filter(rng.random((8, 3, 32, 32)), (0, 0, 2, 2)) * 2 - 0.5, 0, 1).astype(np.float32)


def test_every_check_keeps_shape_and_range_changes_the_images_and_repeats(photos):
    from checks import ACCEPTED, FLAGGED, defect_checks

    labels = np.arange(len(photos)) % 2
    made = FLAGGED | ACCEPTED | defect_checks(donors=(labels, photos, labels))
    for name, check in made.items():
        out = check(photos)
        assert out.shape == photos.shape and out.dtype == np.float32, name
        assert out.min() >= 0 and out.max() <= 1, name
        if name != "png":
            assert not np.allclose(out, photos, atol=1 / 255), name
        np.testing.assert_array_equal(check(photos), out, err_msg=name)


def test_round_trips_go_through_the_product_decoder(photos):
    from checks import jpeg, png, to_uint8

    np.testing.assert_array_equal(to_uint8(png(photos)), to_uint8(photos))  # lossless: only 8-bit rounding
    q75, q90 = np.abs(jpeg(photos, 75) - photos).mean(), np.abs(jpeg(photos, 90) - photos).mean()
    assert 0 < q90 < q75 < 0.05  # lossy, more so at the lower quality


def test_defects_change_one_square_and_cutpaste_takes_another_class(photos):
    from checks import blank, cutpaste, noise_patch

    for out in (noise_patch(photos, 6), blank(photos, 6)):
        changed = (out != photos).any(axis=1)
        assert all(c.sum() <= 36 and c.sum() > 0 for c in changed)
        rows, cols = np.nonzero(changed[0])
        assert rows.max() - rows.min() <= 5 and cols.max() - cols.min() <= 5
    labels, donors = np.zeros(len(photos), int), np.concatenate([photos, 1 - photos])
    donor_labels = np.r_[np.zeros(len(photos), int), np.ones(len(photos), int)]
    out = cutpaste(photos, labels, donors, donor_labels, 4)
    for img, orig in zip(out, photos):  # each patch equals a 4 × 4 square of some class-1 donor (1 − photo)
        rows, cols = np.nonzero((img != orig).any(axis=0))
        top, left = rows.min(), cols.min()
        patch = img[:, top:top + 4, left:left + 4]
        assert any((patch == d[:, r:r + 4, c:c + 4]).all() for d in donors[len(photos):]
                   for r in range(29) for c in range(29))


def test_holes_and_pasted_patches_go_where_they_change_the_image():
    from checks import MIN_CHANGE, blank, cutpaste

    x = np.zeros((20, 1, 28, 28), np.float32)
    x[:, :, :, 20:] = 0.8  # an object on the right quarter, black background elsewhere
    for out in (blank(x, 6), cutpaste(x, np.zeros(20, int), 1 - x, np.ones(20, int), 6)):
        change = np.abs(out - x)
        assert all(c.sum() / 36 >= MIN_CHANGE for c in change)  # never a square that changes nothing
    dark = np.zeros((3, 1, 28, 28), np.float32)  # nothing to hide: the hole goes where it changes most (nowhere)
    np.testing.assert_array_equal(blank(dark, 6), dark)
