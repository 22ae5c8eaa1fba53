"""Does an anomaly map find the anomaly? Pasted patches and the pixel-level AUROC of a map inside vs outside them."""

from __future__ import annotations

import numpy as np

__all__ = ["paste_patches", "pixel_auroc"]


def paste_patches(images: np.ndarray, size: int, rng: np.random.Generator, kind: str = "noise"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each image with one ``size`` × ``size`` patch pasted at a uniformly random place.

    Args:
        images: (N, C, H, W) in [0, 1].
        size: Patch side, pixels.
        rng: Random generator (places and noise).
        kind: ``noise`` (uniform [0, 1] per pixel and channel) or ``square`` (all ones, a bright square).

    Returns:
        (patched images (N, C, H, W) float32, masks (N, H, W) bool, True inside the patch).
    """
    x = np.array(images, dtype=np.float32, copy=True)
    n, c, h, w = x.shape
    if not 0 < size <= min(h, w):
        raise ValueError(f"patch size {size} does not fit images of {h}x{w}")
    masks = np.zeros((n, h, w), dtype=bool)
    tops, lefts = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    for i, (t, l) in enumerate(zip(tops, lefts)):
        patch = rng.random((c, size, size), dtype=np.float32) if kind == "noise" else np.ones((c, size, size))
        x[i, :, t:t + size, l:l + size] = patch
        masks[i, t:t + size, l:l + size] = True
    return x, masks


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC of map values (higher = more anomalous) separating the pixels inside the masks from those outside,
    pooled over every pixel of every image.

    Args:
        maps: (N, H, W) anomaly maps.
        masks: (N, H, W) bool, True where the anomaly is.
    """
    from sklearn.metrics import roc_auc_score

    maps, masks = np.asarray(maps, dtype=np.float64).ravel(), np.asarray(masks, dtype=bool).ravel()
    if masks.all() or not masks.any():
        raise ValueError("the masks must mark some pixels and leave some unmarked")
    finite = np.isfinite(maps)
    low = maps[finite].min() - 1.0 if finite.any() else 0.0
    return float(roc_auc_score(masks, np.where(finite, maps, low)))  # non-finite values count as least anomalous
