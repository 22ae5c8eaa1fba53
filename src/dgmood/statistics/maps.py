"""Per-pixel anomaly maps: where in an image the score model and the training images disagree with it.

Two maps, both (N, H, W) float32, higher = more anomalous:

* the **score-field map** (:class:`AnomalyMap` without a bank): MSMA's score norm ‖σ s(x, σ)‖₂ split into its pixels
  (:func:`pixel_score_norms`, eq. M1), put on a log scale, standardised per pixel and per σ by the training
  images' mean and spread there (eq. M2) and averaged over σ (eq. M3). A pixel that the score model pushes as
  hard as it pushes that pixel of training images scores ~0; a pasted patch, a stroke where training images
  have none, or background where they have content scores several standard deviations.
* the **nearest-image difference** (:func:`difference_map`, eq. M4): the absolute difference, per pixel, to
  the nearest training image in raw pixels (the raw-pixel 1-NN's picture of "what is new here").

:class:`AnomalyMap` standardises both by training images, averages them (eq. M5) and smooths the result over a
pixel or so (eq. M6): an anomaly covers neighbouring pixels, while pixel noise in either view does not.
"""

from __future__ import annotations

import numpy as np
import torch

from dgmood.statistics.base import Statistic

__all__ = ["AnomalyMap", "combined_map", "difference_map", "log_norms", "nearest_indices", "pixel_moments", "pixel_score_norms",
           "smoothed_map", "standardised_map"]

SMOOTH = 1.0
"""σ of the maps' Gaussian smoothing (eq. M6), pixels."""

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


def pixel_moments(values: np.ndarray, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and spread sqrt(var + min_std²) over the first axis of ``values`` (N, ...), float32."""
    values = np.asarray(values, dtype=np.float64)
    return (values.mean(axis=0).astype(np.float32),
            np.sqrt(values.var(axis=0) + min_std**2).astype(np.float32))


def standardised_map(log_a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Eqs. M2–M3: m(x)_hw = (1/L) Σ_l (log a_l(x)_hw − μ_l,hw) / ς_l,hw.

    Args:
        log_a: Log per-pixel norms (N, L, H, W).
        mean, std: Training images' per-pixel mean and spread of ``log_a`` (L, H, W); std > 0.

    Returns:
        (N, H, W) float32, in training standard deviations.
    """
    return ((log_a - mean) / std).mean(axis=1).astype(np.float32)


def nearest_indices(bank, images: np.ndarray, exclude: np.ndarray | None = None, k: int = 1) -> np.ndarray:
    """Index (N,) of each image's nearest bank row in raw pixels (Euclidean); (N, k), nearest first, for k > 1.

    Args:
        bank: (M, D) uint8 training images (as the raw-pixel k-NN keeps them) or float in [0, 1], or a
            :class:`~dgmood.statistics.neighbours.SearchBank` of them (made ready once).
        images: (N, C, H, W) or (N, D) in [0, 1].
        exclude: (N,) a bank row to skip per image (the image itself: leave-one-out), or None.
        k: How many neighbours.
    """
    from dgmood.statistics.neighbours import kneighbors

    index = kneighbors(bank, images, k, exclude=exclude)[1]
    return index[:, 0] if k == 1 else index


def difference_map(images: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Eq. M4: d(x)_hw = min_k (1/C) Σ_c |x_c,hw − n_k(x)_c,hw| over the nearest training images n_k(x) (one, or
    K: each pixel then takes the neighbour that explains it best); (N, H, W) float32.

    Args:
        images: (N, C, H, W) in [0, 1].
        nearest: (N, C, H, W), or (N, K, C, H, W) for K neighbours, in [0, 1].
    """
    x, n = np.asarray(images, np.float32), np.asarray(nearest, np.float32)
    if n.ndim == x.ndim:
        return np.abs(x - n).mean(axis=1)
    return np.abs(x[:, None] - n).mean(axis=2).min(axis=1)


def combined_map(score_map: np.ndarray, difference: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Eq. M5: ½ (m(x) + (d(x) − μ_d) / ς_d), the score-field map and the nearest-image difference each in
    training standard deviations (per-pixel moments μ_d, ς_d of training images' leave-one-out differences),
    equally weighted. Shapes (N, H, W); moments (H, W)."""
    return (0.5 * (score_map + (difference - mean) / std)).astype(np.float32)


def smoothed_map(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Eq. M6: m̄(x) = G_σ * m(x), each map convolved with a 2-D Gaussian of ``sigma`` pixels (edges replicated);
    ``sigma`` 0 returns the maps as they are. Shapes (N, H, W) → (N, H, W) float32.

    Measured (``benchmarks/localisation.py``, docs/results.md): on 4 × 4 to 8 × 8 patches pasted into 28 × 28 images,
    smoothing at 1 pixel raised the pixel AUROC of both the combined map and the nearest-image difference by
    0.003–0.07, most on noise patches, whose pixels alternate between matching and not matching the background."""
    from scipy.ndimage import gaussian_filter

    maps = np.asarray(maps, dtype=np.float32)
    if sigma <= 0:
        return maps
    return gaussian_filter(maps, sigma=(0.0, sigma, sigma), mode="nearest").astype(np.float32)


class AnomalyMap(Statistic):
    """The anomaly map of an explained verdict, fitted on training images: (N, H, W) float32, higher = more
    anomalous, in training standard deviations.

    The score-field map (eqs. M1–M3) at ``sigmas``; with a raw-pixel bank (the detector's k-NN training images)
    also the nearest-image difference (eq. M4), the two averaged (eq. M5); then smoothed (eq. M6). ``fit`` keeps the
    per-pixel mean ``mean_`` and spread ``std_`` (L, H, W) of the training images' log norms and, with a bank,
    ``diff_mean_`` / ``diff_std_`` (H, W) of their leave-one-out nearest-image differences; spreads are
    sqrt(var + floor²) so pixels where every training image agrees (a black background) do not turn sensor noise
    into huge deviations.

    Measured (``benchmarks/localisation.py``, docs/results.md): σ below 0.1 localise a pasted patch poorly
    (pixel noise dominates the per-pixel field there), so the recipes give it the levels from 0.1 up; the difference
    against each pixel's best of 10 neighbours localised pasted patches better than against the nearest image.

    Args:
        sigmas: Noise levels of the score-field part.
        max_fit: At most this many training images are used for the per-pixel moments.
        min_std: Floor of the score-field spread, log units.
        diff_min_std: Floor of the difference's spread, pixel units.
        batch_size: Images per network call.
        smooth: σ of the Gaussian smoothing (eq. M6), pixels; 0 for none.
        neighbours: K of the difference (eq. M4): each pixel against its best of the K nearest training images
            (1: the nearest image, what maps saved before it use).
    """

    name = "anomaly_map"
    fitted = ("mean_", "std_", "diff_mean_", "diff_std_")
    forward_only = True

    def __init__(self, sigmas=(1.0, 0.3, 0.1), max_fit=2000, min_std=0.1, diff_min_std=0.05, batch_size=128,
                 smooth=SMOOTH, neighbours=1):
        self.sigmas = tuple(float(s) for s in sigmas)
        self.neighbours = int(neighbours)
        self.max_fit, self.min_std, self.diff_min_std = int(max_fit), float(min_std), float(diff_min_std)
        self.batch_size, self.smooth = int(batch_size), float(smooth)
        self.mean_ = self.std_ = self.diff_mean_ = self.diff_std_ = None

    def is_fitted(self) -> bool:
        return self.mean_ is not None

    def fit(self, model, images, device="cpu", progress=False, bank: np.ndarray | None = None):
        """Per-pixel moments from the first ``max_fit`` training images; ``bank``: (M, D) uint8 raw-pixel bank
        whose first rows are those images (as the detector's k-NN keeps them), for the difference's moments."""
        x = images[:self.max_fit]
        log_a = log_norms(pixel_score_norms(model, x, self.sigmas, self.batch_size, device))
        self.mean_, self.std_ = pixel_moments(log_a, self.min_std)
        self.diff_mean_ = self.diff_std_ = None
        if bank is not None:
            index = nearest_indices(bank, x, exclude=np.arange(len(x)), k=self.neighbours)
            nearest = bank[index].astype(np.float32) / 255.0
            self.diff_mean_, self.diff_std_ = pixel_moments(difference_map(x, nearest.reshape(*index.shape, *x.shape[1:])),
                                                            self.diff_min_std)
        return self

    def compute(self, model, images, device="cpu", progress=False, nearest: np.ndarray | None = None):
        """The map of ``images`` (N, C, H, W); ``nearest``: their nearest training images, (N, C, H, W) or
        (N, K, C, H, W) with K = ``neighbours``."""
        if not self.is_fitted():
            raise ValueError("AnomalyMap is not fitted; call fit(model, train_images) first")
        log_a = log_norms(pixel_score_norms(model, images, self.sigmas, self.batch_size, device))
        score_map = standardised_map(log_a, self.mean_, self.std_)
        if nearest is not None and self.diff_mean_ is not None:
            score_map = combined_map(score_map, difference_map(images, nearest), self.diff_mean_, self.diff_std_)
        return smoothed_map(score_map, self.smooth)
