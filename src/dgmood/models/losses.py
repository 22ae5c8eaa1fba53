"""Denoising score matching (Vincent 2011) with the NCSN weighting λ(σ) = σ² (METHODS §1)."""

from __future__ import annotations

import math

import torch

__all__ = ["dsm_loss", "sample_sigmas"]


def dsm_loss(model, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample DSM loss ‖σ s(x + σε, σ) + ε‖² / 2.

    Arguments:
        model: Module with ``scaled_score(x, σ)`` returning σ·s(x, σ).
        x: Clean images, shape (N, C, H, W), pixel scale [0, 1].
        sigma: Noise levels, shape (N,), same scale.
        noise: Optional ε of the shape of x; drawn from N(0, I) when omitted.

    Returns:
        Tensor of shape (N,): the loss per image, summed over pixels.
    """
    noise = torch.randn_like(x) if noise is None else noise
    x_noisy = x + sigma[:, None, None, None] * noise
    residual = model.scaled_score(x_noisy, sigma) + noise
    return 0.5 * residual.flatten(1).square().sum(dim=1)


def sample_sigmas(
    n: int,
    sigma_min: float,
    sigma_max: float,
    focus: tuple[float, float] = (0.01, 1.0),
    focus_weight: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training noise levels: log-uniform on ``focus`` with probability ``focus_weight``, else on
    [sigma_min, sigma_max]. The focus band is MSMA's σ grid; the wide band keeps the model usable
    as a VP diffusion over t ∈ [1e-2, 1] later.

    Returns:
        Tensor of shape (n,), pixel scale.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    in_focus = torch.rand(n, generator=generator) < focus_weight
    lo = torch.where(in_focus, math.log(focus[0]), math.log(sigma_min))
    hi = torch.where(in_focus, math.log(focus[1]), math.log(sigma_max))
    return torch.exp(lo + u * (hi - lo)).float()
