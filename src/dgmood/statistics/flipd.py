"""FLIPD local intrinsic dimension of the score model (METHODS §3) as a statistic, σ₀ calibrated on training images."""

from __future__ import annotations

import functools
import warnings

import numpy as np

from dgmood.statistics.base import Statistic, register

__all__ = ["FLIPD", "calibrate_flipd", "lpca_target"]


def lpca_target(train: np.ndarray, pool: int = 10000, n_neighbors: int = 1000, n_queries: int = 200,
                seed: int = 0) -> float:
    """The calibration target: mean LPCA LID of ``n_queries`` training images among the first ``pool`` (METHODS §3)."""
    from dgmood.statistics.calibrate import target_lid

    x = train[:pool]
    return float(target_lid(x.reshape(len(x), -1), n_neighbors=min(n_neighbors, len(x) - 1), n_queries=n_queries,
                            seed=seed))


def calibration_sample(images: np.ndarray, stat) -> tuple[float, np.ndarray]:
    """(LPCA target, calibration points) of a LID statistic's calibration on training ``images`` (METHODS §3)."""
    from dgmood.statistics.calibrate import calibration_points

    target = lpca_target(images, stat.lpca_pool, stat.lpca_neighbors, stat.lpca_queries, stat.seed)
    return target, images[calibration_points(len(images), min(stat.calibration_n, len(images)), seed=stat.seed)]


def calibrate_flipd(model, points: np.ndarray, target: float, probes: int = 4, seed: int = 0,
                    device="cpu", difference: float | None = None) -> dict:
    """FLIPD's σ₀ (pixel scale) whose mean LID over the calibration ``points`` (n, C, H, W) equals ``target``.

    The first crossing from small σ₀ between the pixel σ of VP times 1e-4 and 1, bracketed on a log grid
    (:func:`dgmood.statistics.calibrate.first_crossing`: on RGB images the mean LID rises again at large σ₀), then
    bisected (:func:`dgmood.statistics.calibrate.calibrate_sigma0`); Hutchinson noise can make the curve locally
    non-monotone and bisection keeps a bracket, so the result is a crossing of the target either way.
    Returns ``{"parameter": "sigma0", "value", "achieved"}`` (and ``"clamped": True`` when nothing crossed).
    """
    import torch

    from dgmood.models.diffusion import flipd
    from dgmood.models.noise import t_to_sigma
    from dgmood.statistics.calibrate import calibrate_sigma0, first_crossing

    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)

    @functools.cache  # deterministic: the grid's values are computed once, for the bracket and the fallback
    def mean_flipd(sigma0: float) -> float:
        gen = torch.Generator().manual_seed(seed)
        return float(flipd(model, x, sigma0, probes=probes, generator=gen, difference=difference).mean())

    lo, hi = float(t_to_sigma(1e-4)), float(t_to_sigma(1.0))
    bracket = first_crossing(mean_flipd, target, lo, hi)
    if bracket is None or bracket[0] == bracket[1]:
        # no crossing: the σ₀ of the grid whose mean LID comes nearest the target
        grid = np.geomspace(lo, hi, 13)
        value = float(min(grid, key=lambda s: abs(mean_flipd(float(s)) - target)))
        achieved = mean_flipd(value)
        warnings.warn(f"FLIPD's mean LID over the training points comes no nearer the LPCA target {target:.1f} than "
                      f"{achieved:.1f}, at σ₀ = {value:.4g} (σ₀ in [{lo:.3g}, {hi:.3g}]); using that σ₀. The model's "
                      "FLIPD and LPCA disagree on this data, or the model is undertrained.", RuntimeWarning,
                      stacklevel=2)
        return {"parameter": "sigma0", "value": value, "achieved": achieved, "clamped": True}
    value = calibrate_sigma0(mean_flipd, target, *bracket, tol=0.5, check_monotone=False)
    return {"parameter": "sigma0", "value": value, "achieved": mean_flipd(value)}


@register
class FLIPD(Statistic):
    """FLIPD LID estimate at noise level σ₀, shape (N,) (a real number, not clipped to [0, D]).

    ``fit`` calibrates σ₀ (METHODS §3): the mean FLIPD of ``calibration_n`` random training images matches the
    training set's mean LPCA LID. Given ``sigma0``, ``fit`` keeps it.

    Args:
        sigma0: Noise level, pixel scale; None: calibrated by ``fit``.
        probes: Hutchinson probes of the trace.
        seed: Seed of the probes and of the calibration draw.
        calibration_n, lpca_queries, lpca_pool, lpca_neighbors: The calibration (the paper: 80 points, k = 1000).
        batch_size: Images per network call.
        difference: None: the Hutchinson trace by autograd; r: by central differences of step r·σ₀, forward
            passes only (:func:`dgmood.models.diffusion.difference_trace`; the combined detector's default).
    """

    name = "flipd"
    fitted = ("sigma0_",)

    def __init__(self, sigma0=None, probes=4, seed=0, calibration_n=80, lpca_queries=200, lpca_pool=10000,
                 lpca_neighbors=1000, batch_size=32, difference=None):
        self.sigma0, self.probes, self.seed = sigma0, int(probes), int(seed)
        self.calibration_n, self.lpca_queries = int(calibration_n), int(lpca_queries)
        self.lpca_pool, self.lpca_neighbors, self.batch_size = int(lpca_pool), int(lpca_neighbors), int(batch_size)
        self.difference = None if difference is None else float(difference)
        self.sigma0_ = None

    @property
    def forward_only(self) -> bool:
        """True with the difference trace (forward passes only), False with the autograd one."""
        return self.difference is not None

    def fit(self, model, images, device="cpu", progress=False):
        if self.sigma0 is not None:
            self.sigma0_ = float(self.sigma0)
            return self
        target, points = calibration_sample(images, self)
        self.calibration_ = dict(calibrate_flipd(model, points, target, self.probes, self.seed, device,
                                                 self.difference),
                                 target_lpca=target)
        self.sigma0_ = float(self.calibration_["value"])
        return self

    def _lens(self):
        from dgmood.statistics.lens import LensConfig

        return LensConfig(lens="diffusion", lid="flipd", probes=self.probes, seed=self.seed,
                          batch_size=self.batch_size)

    def compute(self, model, images, device="cpu", progress=False):
        from dgmood.statistics.lens import compute_statistic

        if self.sigma0_ is None:
            raise ValueError("FLIPD is not fitted: call fit(model, train_images) to calibrate σ₀, or pass sigma0")
        return compute_statistic(model, images, self._lens(), "flipd", device, progress, sigma0=self.sigma0_,
                                 difference=self.difference)[0]

    def cache_settings(self, training: bool = False) -> dict:
        settings = {"probes": self.probes, "seed": self.seed, "noise": "per-image", "sigma0": self.sigma0_}
        return settings if self.difference is None else dict(settings, difference=self.difference)
