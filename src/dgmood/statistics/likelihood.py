"""Log-likelihood and the flow's Jacobian LID (METHODS §3) as statistics, for the dual-threshold method."""

from __future__ import annotations

import numpy as np

from dgmood.statistics.base import Statistic, register

__all__ = ["JacobianLID", "LogLikelihood"]


@register
class LogLikelihood(Statistic):
    """log p(x) in nats per image on the [0, 1] pixel scale, shape (N,).

    ``lens="flow"``: the image flow's exact log-likelihood of the dequantised image. ``lens="diffusion"``: the
    score model's PF-ODE log-likelihood (``solver``, ``tol``, ``t_eps``, ``probes`` Hutchinson probes; ``steps`` and
    ``spacing`` of the fixed-step solvers ``heun`` and ``euler``, see :class:`~dgmood.statistics.lens.LensConfig`).
    """

    name = "log_likelihood"

    def __init__(self, lens="flow", solver="adaptive", tol=1e-3, t_eps=1e-2, probes=4, seed=0, batch_size=32,
                 steps=25, spacing="uniform"):
        self.lens, self.solver, self.tol, self.t_eps = lens, solver, float(tol), float(t_eps)
        self.probes, self.seed, self.batch_size = int(probes), int(seed), int(batch_size)
        self.steps, self.spacing = int(steps), spacing

    def _config(self):
        from dgmood.statistics.lens import LIDS, LensConfig

        return LensConfig(lens=self.lens, lid=LIDS[self.lens][0], solver=self.solver, tol=self.tol, t_eps=self.t_eps,
                          probes=self.probes, seed=self.seed, batch_size=self.batch_size, steps=self.steps,
                          spacing=self.spacing)

    def compute(self, model, images, device="cpu", progress=False):
        from dgmood.statistics.lens import compute_statistic

        return compute_statistic(model, images, self._config(), "log_likelihood", device, progress)[0]

    def cache_settings(self, training: bool = False) -> dict:
        if self.lens == "flow":
            return {"lens": "flow"}
        settings = {"lens": self.lens, "solver": self.solver, "tol": self.tol, "t_eps": self.t_eps,
                    "probes": self.probes, "seed": self.seed}
        if self.solver != "adaptive":
            settings.update(steps=self.steps, spacing=self.spacing)
        return settings


@register
class JacobianLID(Statistic):
    """The flow's LID: the number of singular values of the generator Jacobian above τ, shape (N,).

    ``fit`` calibrates τ (METHODS §3) so that the mean LID of ``calibration_n`` random training images equals
    the training set's mean LPCA LID (exact: :func:`dgmood.statistics.calibrate.calibrate_tau`).
    """

    name = "jacobian_lid"
    fitted = ("tau_",)

    def __init__(self, tau=None, seed=0, calibration_n=80, lpca_queries=200, lpca_pool=10000, lpca_neighbors=1000,
                 batch_size=32):
        self.tau, self.seed, self.calibration_n = tau, int(seed), int(calibration_n)
        self.lpca_queries, self.lpca_pool, self.lpca_neighbors = int(lpca_queries), int(lpca_pool), int(lpca_neighbors)
        self.batch_size = int(batch_size)
        self.tau_ = None

    def _singular_values(self, model, images, device, progress) -> np.ndarray:
        from dgmood.statistics.lens import LensConfig, compute_statistic

        lens = LensConfig(lens="flow", lid="jacobian", seed=self.seed, batch_size=self.batch_size)
        return compute_statistic(model, images, lens, "jacobian_sv", device, progress)[0]

    def fit(self, model, images, device="cpu", progress=False):
        from dgmood.statistics.calibrate import calibrate_tau
        from dgmood.statistics.flipd import calibration_sample

        if self.tau is not None:
            self.tau_ = float(self.tau)
            return self
        target, points = calibration_sample(images, self)
        sv = self._singular_values(model, points, device, progress)
        self.tau_ = float(calibrate_tau(sv, target, kind="flow", dim=points[0].size))
        return self

    def compute(self, model, images, device="cpu", progress=False):
        if self.tau_ is None:
            raise ValueError("JacobianLID is not fitted: call fit(model, train_images) to calibrate τ, or pass tau")
        return (self._singular_values(model, images, device, progress) > self.tau_).sum(axis=1).astype(np.float64)

    def cache_settings(self, training: bool = False) -> dict:
        return {"tau": self.tau_, "seed": self.seed}
