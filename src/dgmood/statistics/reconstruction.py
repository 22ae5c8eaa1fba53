"""Diffusion reconstruction error (Graham et al. 2023; METHODS §3) as a statistic."""

from __future__ import annotations

from dgmood.statistics.base import Statistic, register

__all__ = ["Reconstruction"]


@register
class Reconstruction(Statistic):
    """Noise each image to σ, denoise by ``steps`` probability-flow Euler steps, compare: errors (N, L).

    Args:
        sigmas: Noise levels, pixel scale.
        steps: Euler steps per level.
        seed: Seed of the noise.
        batch_size: Images per network call.
    """

    name = "reconstruction"
    log_scale = True
    forward_only = True

    def __init__(self, sigmas=(0.1, 0.3), steps=5, seed=0, batch_size=32):
        self.sigmas, self.steps = tuple(float(s) for s in sigmas), int(steps)
        self.seed, self.batch_size = int(seed), int(batch_size)

    def compute(self, model, images, device="cpu", progress=False):
        from dgmood.statistics.lens import LensConfig, compute_statistic

        lens = LensConfig(lens="diffusion", lid="flipd", seed=self.seed, batch_size=self.batch_size)
        return compute_statistic(model, images, lens, "reconstruction", device, progress, sigmas=list(self.sigmas),
                                 steps=self.steps)[0]

    def cache_settings(self, training: bool = False) -> dict:
        return {"seed": self.seed, "noise": "per-image", "sigmas": list(self.sigmas), "steps": self.steps}

    def columns(self, n_columns: int) -> list[str]:
        return [f"reconstruction@sigma={s:.4g}" for s in self.sigmas]
