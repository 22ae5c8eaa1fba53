"""Per-pixel anomaly maps: where in an image the score model and the training images disagree with it.

Two maps, both (N, H, W) float32, higher = more anomalous:

* the **score-field map** (:class:`ScoreFieldMap`): MSMA's score norm ‖σ s(x, σ)‖₂ split into its pixels
  (:func:`pixel_score_norms`, eq. M1), put on a log scale, standardised per pixel and per σ by the training
  images' mean and spread there (eq. M2) and averaged over σ (eq. M3). A pixel that the score model pushes as
  hard as it pushes that pixel of training images scores ~0; a pasted patch, a stroke where training images
  have none, or background where they have content scores several standard deviations.
* the **nearest-image difference** (:func:`difference_map`, eq. M4): the absolute difference, per pixel, to
  the nearest training image in raw pixels (the raw-pixel 1-NN's picture of "what is new here").
"""

from __future__ import annotations

import numpy as np
import torch

from dgmood.statistics.base import Statistic

__all__ = ["ScoreFieldMap", "difference_map", "nearest_indices", "pixel_score_norms", "standardised_map"]

LOG_FLOOR = 1e-6
"""Floor of per-pixel norms before the log (pixels where the score field vanishes)."""


@torch.no_grad()
def pixel_score_norms(model, images: np.ndarray, sigmas, batch_size: int = 128, device="cpu") -> np.ndarray:
    """Eq. M1: a_l(x)_hw = ‖σ_l s(x, σ_l)_{·,h,w}‖₂, the score norm of each pixel (over its channels).

    Σ_hw a_l(x)_hw² is MSMA's squared score norm at σ_l (MSMA eq. 4).

    Args:
        model: Module with ``scaled_score(x, σ)`` = σ·s(x, σ).
        images: Clean images (N, C, H, W) in [0, 1].
        sigmas: Noise levels (L,), pixel scale.

    Returns:
        (N, L, H, W) float32.
    """
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    n, _, h, w = images.shape
    out = np.empty((n, len(sigmas), h, w), dtype=np.float32)
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device)
        for i, sigma in enumerate(sigmas):
            s = model.scaled_score(x, torch.full((len(x),), float(sigma), device=device))
            out[start:start + len(x), i] = s.norm(dim=1).cpu().numpy()
    return out


def log_norms(norms: np.ndarray) -> np.ndarray:
    """log max(a, LOG_FLOOR), float32, same shape."""
    return np.log(np.maximum(norms, LOG_FLOOR)).astype(np.float32)


def standardised_map(log_a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Eqs. M2–M3: m(x)_hw = (1/L) Σ_l (log a_l(x)_hw − μ_l,hw) / ς_l,hw.

    Args:
        log_a: Log per-pixel norms (N, L, H, W).
        mean, std: Training images' per-pixel mean and spread of ``log_a`` (L, H, W); std > 0.

    Returns:
        (N, H, W) float32, in training standard deviations.
    """
    return ((log_a - mean) / std).mean(axis=1).astype(np.float32)


def nearest_indices(bank: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Index (N,) of each image's nearest bank row in raw pixels (Euclidean).

    Args:
        bank: (M, D) uint8 training images (as the raw-pixel k-NN keeps them) or float in [0, 1].
        images: (N, C, H, W) or (N, D) in [0, 1].
    """
    from sklearn.neighbors import NearestNeighbors

    ref = bank.astype(np.float32) / 255.0 if bank.dtype == np.uint8 else np.asarray(bank, dtype=np.float32)
    nn = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(ref)
    return nn.kneighbors(np.asarray(images, dtype=np.float32).reshape(len(images), -1))[1][:, 0]


def difference_map(images: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Eq. M4: d(x)_hw = (1/C) Σ_c |x_c,hw − n(x)_c,hw| with n(x) the nearest training image; (N, H, W) float32.

    Args:
        images, nearest: (N, C, H, W) in [0, 1].
    """
    return np.abs(np.asarray(images, np.float32) - np.asarray(nearest, np.float32)).mean(axis=1)


class ScoreFieldMap(Statistic):
    """The score-field anomaly map (eqs. M1–M3), fitted on training images: (N, H, W) float32.

    ``fit`` keeps the per-pixel mean ``mean_`` and spread ``std_`` (L, H, W) of the training images' log norms;
    the spread is sqrt(var + ``min_std``²) so that pixels where every training image agrees (a black background)
    do not turn sensor noise into huge deviations.

    Args:
        sigmas: Noise levels of the map (the combined detector's score-norm levels).
        max_fit: At most this many training images are used for the per-pixel statistics.
        min_std: Floor of the spread, log units.
        batch_size: Images per network call.
    """

    name = "score_map"
    fitted = ("mean_", "std_")

    def __init__(self, sigmas=(0.01, 0.1, 1.0), max_fit=2000, min_std=0.1, batch_size=128):
        self.sigmas = tuple(float(s) for s in sigmas)
        self.max_fit, self.min_std, self.batch_size = int(max_fit), float(min_std), int(batch_size)
        self.mean_ = self.std_ = None

    def fit(self, model, images, device="cpu", progress=False):
        log_a = log_norms(pixel_score_norms(model, images[:self.max_fit], self.sigmas, self.batch_size, device))
        self.mean_ = log_a.mean(axis=0)
        self.std_ = np.sqrt(log_a.var(axis=0) + self.min_std**2).astype(np.float32)
        return self

    def compute(self, model, images, device="cpu", progress=False):
        if not self.is_fitted():
            raise ValueError("ScoreFieldMap is not fitted; call fit(model, train_images) first")
        log_a = log_norms(pixel_score_norms(model, images, self.sigmas, self.batch_size, device))
        return standardised_map(log_a, self.mean_, self.std_)
