"""Noise levels: the MSMA σ grid and the σ ↔ t conversion to a VP diffusion (METHODS §1)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "BETA_MAX",
    "BETA_MIN",
    "geometric_sigmas",
    "sigma_to_t",
    "t_to_sigma",
    "vp_alpha",
    "vp_score",
]

BETA_MIN = 0.1
BETA_MAX = 20.0


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, n: int = 10) -> np.ndarray:
    """MSMA's noise grid σ_1 = sigma_max > … > σ_n = sigma_min, geometric (MSMA §5, appendix A.2).

    Returns:
        Array of shape (n,), descending, on the [0, 1] pixel scale.
    """
    if n < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need n >= 1 and 0 < sigma_min <= sigma_max, got n={n}, [{sigma_min}, {sigma_max}]")
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)
    return np.geomspace(sigma_max, sigma_min, n)


def _integrated_beta(t, beta_min: float, beta_max: float):
    """∫₀ᵗ β(s) ds for the linear schedule β(s) = β_min + s (β_max − β_min)."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def vp_alpha(t, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX):
    """Signal scale α_t = exp(−½ ∫₀ᵗ β) of the VP-SDE; t in [0, 1], works on floats and tensors."""
    exp = torch.exp if isinstance(t, torch.Tensor) else np.exp
    return exp(-0.5 * _integrated_beta(t, beta_min, beta_max))


def t_to_sigma(t, scale: float = 2.0, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX):
    """σ(t) = sqrt(1 − α_t²) / α_t, divided by ``scale`` to land on the [0, 1] pixel scale.

    Arguments:
        t: Diffusion time(s) in (0, 1].
        scale: Width of the diffusion's data range relative to [0, 1]; 2 for data in [−1, 1].
    """
    b = _integrated_beta(t, beta_min, beta_max)
    expm1, sqrt = (torch.expm1, torch.sqrt) if isinstance(t, torch.Tensor) else (np.expm1, np.sqrt)
    return sqrt(expm1(b)) / scale


def sigma_to_t(sigma, scale: float = 2.0, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX):
    """Inverse of :func:`t_to_sigma`: solves ½(β_max − β_min) t² + β_min t = log(1 + (scale σ)²)."""
    log1p, sqrt = (torch.log1p, torch.sqrt) if isinstance(sigma, torch.Tensor) else (np.log1p, np.sqrt)
    b = log1p((scale * sigma) ** 2)
    a = 0.5 * (beta_max - beta_min)
    return (-beta_min + sqrt(beta_min**2 + 4 * a * b)) / (2 * a)


def vp_score(score_fn, x_t: torch.Tensor, t: float, scale: float = 2.0) -> torch.Tensor:
    """∇ log p_t(x_t) of the VP diffusion from a σ-conditioned score on the [0, 1] pixel scale.

    The diffusion sees y = scale·x − (scale − 1) (so [−1, 1] for scale 2) and x_t = α_t y + …;
    then x̃ = (x_t/α_t + scale − 1)/scale is the σ(t)-smoothed pixel point and
    ∇_{x_t} log p_t(x_t) = s(x̃, σ(t)) / (α_t · scale)   (METHODS §1).

    Arguments:
        score_fn: Callable (x̃ of shape (N, C, H, W), σ of shape (N,)) → score, same shape.
        x_t: VP states, shape (N, C, H, W).
        t: Diffusion time in (0, 1].
        scale: Width of the diffusion's data range relative to [0, 1].
    """
    alpha = float(vp_alpha(t))
    x_pix = (x_t / alpha + scale - 1.0) / scale
    sigma = torch.full((x_t.shape[0],), float(t_to_sigma(t, scale)), dtype=x_t.dtype, device=x_t.device)
    return score_fn(x_pix, sigma) / (alpha * scale)
