"""Pixel perturbation of Ren et al. (2019): the training input of a likelihood-ratio background model."""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_MU", "perturb"]

DEFAULT_MU = 0.15
"""Default perturbation rate μ for the background model of :func:`likelihood_ratio`.

Chosen without any data: the midpoint of the range Ren et al. (2019) report working on
FashionMNIST (μ in [0.1, 0.2]). It is not tuned here, on in-distribution data or otherwise; but the
range itself came out of the authors' hyperparameter search, which was scored on OOD validation
data, so the value is not free of that choice. We know of no sound in-distribution-only criterion
for μ: how well the background model fits perturbed in-distribution data does not say how much
semantic content it should be blind to, which is what μ sets. So none is used."""


def perturb(images: torch.Tensor, mu: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training input of Ren et al.'s (2019) background model: each pixel independently, with
    probability ``mu``, replaced by a uniformly random 8-bit value k/255, k ∈ {0, …, 255}.

    A pixel's channels are replaced together (one draw decides the pixel; each channel then gets
    its own uniform level, i.e. a uniform random colour); for C = 1 this is exactly Ren et al.'s
    mutation. A replacement can equal the old value (probability 1/256 per channel).

    Arguments:
        images: shape (N, C, H, W), floating point, values in [0, 1] (not checked).
        mu: perturbation rate in [0, 1]; see :data:`DEFAULT_MU`.
        generator: random source (its device is where the draws are made); None = torch's global one.

    Returns:
        a new tensor, shape, dtype and device of ``images``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating-point tensor of shape (N, C, H, W), got {got}")
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu <= 1:
        raise ValueError(f"mu must be a number in [0, 1], got {mu!r}")
    n, c, h, w = images.shape
    device = images.device if generator is None else generator.device
    chosen = torch.rand((n, 1, h, w), generator=generator, device=device) < mu
    levels = torch.randint(0, 256, (n, c, h, w), generator=generator, device=device)
    noise = (levels.to(images.dtype) / 255).to(images.device)
    return torch.where(chosen.to(images.device), noise, images)
