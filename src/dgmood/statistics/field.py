"""Position-aware statistics: how far an image's per-pixel layout lies from the training images' layout.

MSMA's score norms and the other scalar statistics sum over pixels, so an image whose content is right but in
the wrong place (flipped, rotated) can keep every one of them. These keep position:

* :class:`ScoreFieldDeviation`: per σ, the mean over pixels of the squared standardised log score norm
  (eq. F1, the per-pixel z of the anomaly map, eq. M2): a diagonal Gaussian's energy of the score field's layout.
* :class:`PixelDeviation`: the same for the raw pixel values (eq. F2), no network pass.
"""

from __future__ import annotations

import numpy as np

from dgmood.statistics.base import Statistic, array_digest, register
from dgmood.statistics.maps import log_norms, pixel_moments, pixel_score_norms

__all__ = ["PixelDeviation", "ScoreFieldDeviation", "ScoreFieldStatistic", "layout_energy"]


def layout_energy(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Eqs. F1/F2: e(x) = (1/HW) Σ_hw ((v(x)_hw − μ_hw) / ς_hw)², per leading channel.

    Args:
        values: (N, L, H, W) per-pixel values.
        mean, std: (L, H, W) their training mean and spread.

    Returns:
        (N, L) float64.
    """
    z = (np.asarray(values, dtype=np.float32) - mean) / std
    return (z.astype(np.float64) ** 2).mean(axis=(2, 3))


class ScoreFieldStatistic(Statistic):
    """Base of the statistics of the per-pixel score field: log score norms at ``sigmas`` (eq. M1) and their
    per-pixel training moments (eq. M2), fitted on at most ``max_fit`` training images; subclasses turn the field of
    new images into values (:meth:`_field` gives it, checked fitted).

    Args:
        sigmas: Noise levels.
        max_fit: Training images used for the per-pixel moments (at most).
        min_std: Floor of the per-pixel spread, log units.
        batch_size: Images per network call.
    """

    log_scale = True
    forward_only = True
    fitted = ("mean_", "std_")

    def __init__(self, sigmas=(1.0, 0.1, 0.01), max_fit=5000, min_std=0.1, batch_size=128):
        self.sigmas = tuple(float(s) for s in sigmas)
        self.max_fit, self.min_std, self.batch_size = int(max_fit), float(min_std), int(batch_size)
        self.mean_ = self.std_ = None

    def _log_norms(self, model, images, device) -> np.ndarray:
        return log_norms(pixel_score_norms(model, images, self.sigmas, self.batch_size, device))

    def _field(self, model, images, device) -> np.ndarray:
        """Log per-pixel score norms (N, L, H, W) of ``images``; ValueError when not fitted."""
        if not self.is_fitted():
            raise ValueError(f"{type(self).__name__} is not fitted; call fit(model, train_images) first")
        return self._log_norms(model, images, device)

    def fit(self, model, images, device="cpu", progress=False):
        self.mean_, self.std_ = pixel_moments(self._log_norms(model, images[:self.max_fit], device), self.min_std)
        return self

    def cache_settings(self, training: bool = False) -> dict:
        return {**self.get_params(), "moments": array_digest(self.mean_, self.std_)}


@register
class ScoreFieldDeviation(ScoreFieldStatistic):
    """Eq. F1 at each σ: (N, L), the layout energy of the log per-pixel score norms (eq. M1). Arguments as
    :class:`ScoreFieldStatistic`."""

    name = "field"

    def compute(self, model, images, device="cpu", progress=False):
        return layout_energy(self._field(model, images, device), self.mean_, self.std_)

    def columns(self, n_columns: int) -> list[str]:
        return [f"field@sigma={s:.4g}" for s in self.sigmas]


@register
class PixelDeviation(Statistic):
    """Eq. F2: (N,), the layout energy of the raw pixel values (channels averaged). Needs no model.

    Args:
        min_std: Floor of the per-pixel spread, pixel units.
    """

    name = "pixels"
    log_scale = True
    fitted = ("mean_", "std_")

    def __init__(self, min_std=0.05):
        self.min_std = float(min_std)
        self.mean_ = self.std_ = None

    def fit(self, model, images, device="cpu", progress=False):
        self.mean_, self.std_ = pixel_moments(np.asarray(images, np.float32).mean(axis=1, keepdims=True), self.min_std)
        return self

    def compute(self, model, images, device="cpu", progress=False):
        if not self.is_fitted():
            raise ValueError("PixelDeviation is not fitted; call fit(model, train_images) first")
        return layout_energy(np.asarray(images, np.float32).mean(axis=1, keepdims=True), self.mean_, self.std_)[:, 0]

    def cache_settings(self, training: bool = False) -> dict:
        return {**self.get_params(), "moments": array_digest(self.mean_, self.std_)}

