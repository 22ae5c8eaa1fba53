"""In-distribution-made checks: in-distribution test images changed in ways a detector must flag, or must accept.

No OOD data goes in. Every function takes and returns float32 images (N, C, H, W) in [0, 1]; random ones are seeded,
so a set is the same in every run (its name is a cache key).

- Global changes a detector should flag (:data:`FLAGGED`): vertical flip, rotation by 90°, colour removed (luma
  in every channel), inverted, a 1-pixel Gaussian blur.
- Local defects (:func:`defect_checks`, issue 28): a pasted patch of uniform noise, a patch pasted from a training
  image of another class (CutPaste), a bright 1-pixel line across the middle (a scratch), a blanked (black) square
  over part of the object (a hole).
- Harmless changes a detector must accept like the test set itself (:data:`ACCEPTED`): a horizontal flip, the
  images re-encoded as JPEG quality 90 and as PNG (decoded by the product's own image policy).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np

Check = Callable[[np.ndarray], np.ndarray]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] → uint8 levels, rounded."""
    return np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def round_trip(x: np.ndarray, fmt: str, **save) -> np.ndarray:
    """Images encoded one by one with Pillow (``fmt``, ``save`` options) and decoded by dgmood's image policy at
    their own size (:func:`dgmood.data.images.decode`): what a user's re-saved files would score as."""
    from PIL import Image

    from dgmood.data.images import ImagePolicy, decode

    channels, height, width = x.shape[1:]
    policy = ImagePolicy(shape=(channels, height, width), resize="error")
    out = np.empty(x.shape, np.float32)
    for i, img in enumerate(to_uint8(x)):
        buf = io.BytesIO()
        pixels = img[0] if channels == 1 else img.transpose(1, 2, 0)
        Image.fromarray(pixels).save(buf, format=fmt, **save)
        out[i] = decode(buf.getvalue(), f"image {i}", policy)[0] / np.float32(255.0)
    return out


def jpeg(x: np.ndarray, quality: int = 75) -> np.ndarray:
    """A JPEG round trip at ``quality`` with 4:2:0 chroma subsampling (the CIFAR-10 copy's encoding)."""
    return round_trip(x, "JPEG", quality=quality, subsampling=2)


def png(x: np.ndarray) -> np.ndarray:
    """A PNG round trip (lossless: only the rounding to 8-bit levels)."""
    return round_trip(x, "PNG")


def hflip(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[..., ::-1])


def vflip(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[..., ::-1, :])


def rot90(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, axes=(2, 3)))


def grey(x: np.ndarray) -> np.ndarray:
    """Colour removed: ITU-R 601 luma in every channel (grey images are returned unchanged)."""
    if x.shape[1] == 1:
        return x
    luma = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), x, axes=([0], [1]))
    return np.repeat(luma[:, None], x.shape[1], axis=1).astype(np.float32)


def invert(x: np.ndarray) -> np.ndarray:
    return (1.0 - x).astype(np.float32)


def blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """A Gaussian blur of ``sigma`` pixels per channel (reflected borders)."""
    from scipy.ndimage import gaussian_filter

    return np.clip(gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect"), 0, 1).astype(np.float32)


FLAGGED: dict[str, Check] = {"vflip": vflip, "rot90": rot90, "grey": grey, "invert": invert, "blur": blur}
"""Global changes that make a test image out of distribution (grey is left out for grey images)."""

ACCEPTED: dict[str, Check] = {"hflip": hflip, "jpeg90": lambda x: jpeg(x, 90), "png": png}
"""Harmless changes: accepted at the default threshold like the test set (photographs are mirrored and re-saved
all the time)."""


# --- local defects (issue 28) ----------------------------------------------------------------------------------


def _places(n: int, height: int, width: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) top-left corners of ``size`` × ``size`` squares inside an H × W image."""
    return np.stack([rng.integers(0, height - size + 1, n), rng.integers(0, width - size + 1, n)], axis=1)


MIN_CHANGE = 0.2
"""A defect must change its square by this much (mean absolute change over the square's pixels and channels, [0, 1]
scale): a black square on black background, or a patch pasted onto the same content, leaves the image as it was
and is no defect (at random places on FashionMNIST 20 % of 6 × 6 black squares changed nothing, on MNIST 38 %)."""


def _changing_place(change: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random top-left corner among those whose square changes the image by at least :data:`MIN_CHANGE`
    (``change``: (H − s + 1, W − s + 1), the mean absolute change of the square at each corner); the corner of the
    largest change when none does (an image with nothing to change)."""
    ok = np.flatnonzero(change.ravel() >= MIN_CHANGE)
    flat = ok[rng.integers(len(ok))] if len(ok) else int(change.argmax())
    return divmod(int(flat), change.shape[1])


def _square_change(img: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """Mean absolute change of pasting ``patch`` (C, s, s) over ``img`` (C, H, W) at every corner,
    (H − s + 1, W − s + 1)."""
    s = patch.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(img, (s, s), axis=(1, 2))  # (C, H−s+1, W−s+1, s, s)
    return np.abs(windows - patch[:, None, None]).mean(axis=(0, 3, 4))


def noise_patch(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A ``size`` × ``size`` square of uniform noise (independent per pixel and channel) at a random place."""
    rng = np.random.default_rng([seed, size, 1])
    out = x.copy()
    for img, (top, left) in zip(out, _places(len(x), *x.shape[2:], size, rng)):
        img[:, top:top + size, left:left + size] = rng.random((x.shape[1], size, size), dtype=np.float32)
    return out


def blank(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A black ``size`` × ``size`` square at a random place where it hides something (:func:`_changing_place`):
    a missing part."""
    rng = np.random.default_rng([seed, size, 2])
    out = x.copy()
    for img in out:
        top, left = _changing_place(_square_change(img, np.zeros((len(img), size, size), img.dtype)), rng)
        img[:, top:top + size, left:left + size] = 0.0
    return out


def cutpaste(x: np.ndarray, labels: np.ndarray, donors: np.ndarray, donor_labels: np.ndarray, size: int,
             seed: int = 0) -> np.ndarray:
    """A ``size`` × ``size`` patch cut from a random place of a random training image (``donors``) of another class
    and pasted at a random place where it changes the image (CutPaste, Li et al. 2021; :func:`_changing_place`)."""
    rng = np.random.default_rng([seed, size, 3])
    out = x.copy()
    h, w = x.shape[2:]
    sources = _places(len(x), h, w, size, rng)
    for i, img in enumerate(out):
        others = np.flatnonzero(donor_labels != labels[i])
        j = others[rng.integers(len(others))]
        st, sl = sources[i]
        patch = donors[j, :, st:st + size, sl:sl + size]
        top, left = _changing_place(_square_change(img, patch), rng)
        img[:, top:top + size, left:left + size] = patch
    return out


def scratch(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A bright (1.0) 1-pixel line through the middle half of the image at a random angle, spanning 60 % of the
    shorter side: a scratch across the object."""
    rng = np.random.default_rng([seed, 4])
    out = x.copy()
    h, w = x.shape[2:]
    half = 0.3 * min(h, w)
    t = np.linspace(-1.0, 1.0, 4 * max(h, w))
    for img in out:
        cy, cx = rng.uniform(0.25, 0.75) * (h - 1), rng.uniform(0.25, 0.75) * (w - 1)
        angle = rng.uniform(0, np.pi)
        rows = np.clip(np.rint(cy + half * t * np.sin(angle)), 0, h - 1).astype(int)
        cols = np.clip(np.rint(cx + half * t * np.cos(angle)), 0, w - 1).astype(int)
        img[:, rows, cols] = 1.0
    return out


def defect_checks(sizes=(4, 6, 8), donors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                  ) -> dict[str, Check]:
    """The local defects as checks: ``noise{s}``, ``hole{s}`` (:func:`blank`), ``paste{s}`` (:func:`cutpaste`) per
    size and ``scratch``. The hole and the pasted patch go where they change the image (:data:`MIN_CHANGE`); their
    names are new since that rule (the sets named ``blank{s}`` and ``cutpaste{s}`` in older caches were anywhere).

    Arguments:
        sizes: Square sides in pixels.
        donors: (test labels, training images, training labels) for CutPaste; None leaves it out.
    """
    checks: dict[str, Check] = {"scratch": scratch}
    for s in sizes:
        checks[f"noise{s}"] = lambda x, s=s: noise_patch(x, s)
        checks[f"hole{s}"] = lambda x, s=s: blank(x, s)
        if donors is not None:
            labels, images, image_labels = donors
            checks[f"paste{s}"] = lambda x, s=s: cutpaste(x, labels[:len(x)], images, image_labels, s)
    return checks
