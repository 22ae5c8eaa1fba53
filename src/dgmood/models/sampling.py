"""Sampling the score model: EDM's deterministic Heun solver of the probability-flow ODE (Karras et al. 2022)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from dgmood.models.diffusion import karras_sigmas, sigma_like

__all__ = ["heun_sampler", "sample_score_model"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def heun_sampler(score_fn: ScoreFn, x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    r"""Solve the probability-flow ODE dx/dσ = −σ s(x, σ) along ``sigmas`` by Heun's method (Karras et al. 2022,
    Algorithm 1, deterministic; eq. 4 with σ(t) = t and s(t) = 1).

    The direction is :math:`d = (x - D(x; \sigma)) / \sigma = -\sigma\, s(x, \sigma)`, since the denoiser is
    :math:`D(x; \sigma) = x + \sigma^2 s(x, \sigma)` (Tweedie). Each step is an Euler step corrected by the
    direction at its end (trapezoidal rule), except the last one to σ = 0, which stays Euler; so a grid of
    N nonzero values and a final 0 costs 2N − 1 calls of ``score_fn``.

    Arguments:
        score_fn: s(x̃, σ): (x̃ of shape (N, ...), σ of shape (N,)) → shape of x̃, units 1/(units of x).
        x: Start, shape (N, ...): a draw from p_{σ_0}, e.g. centre + σ_0 · ε.
        sigmas: Decreasing noise levels σ_0 > … > σ_{N−1} > 0 = σ_N (e.g. :func:`dgmood.models.diffusion.karras_sigmas`).

    Returns:
        x at the last σ, shape of x.

    References:
        | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., NeurIPS 2022),
        | https://arxiv.org/abs/2206.00364
    """
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = -s_cur * score_fn(x, sigma_like(x, s_cur))  # Alg. 1 line 4: d_i = (x_i − D(x_i; t_i)) / t_i
        x_next = x + (s_next - s_cur) * d_cur  # line 5: Euler step from t_i to t_{i+1}
        if s_next > 0:  # lines 6-8: second-order correction
            d_next = -s_next * score_fn(x_next, sigma_like(x_next, s_next))
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


def sample_score_model(
    model: ScoreFn,
    n: int,
    steps: int = 18,
    sigma_max: float = 80.0,
    sigma_min: float = 0.002,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    shape: tuple[int, ...] | None = None,
    center: float = 0.5,
    clamp: bool = True,
) -> np.ndarray:
    """Draw images from a score model on the [0, 1] pixel scale by :func:`heun_sampler` (EDM's deterministic sampler).

    The start is x = ``center`` + σ_max ε, ε ~ N(0, I): the smoothed data density at σ_max = 80 is that Gaussian up
    to the data's own spread (pixel values in [0, 1], centred at 0.5 as the network's input preconditioning does).
    All noise is drawn at once from ``generator`` on the CPU, so the result does not depend on ``batch_size``
    or ``device``. The σ grid is EDM's ρ = 7 grid (eq. 5) of ``steps`` values from σ_max to σ_min, then 0; cost
    2·steps − 1 network calls per image (35 for the default 18 steps).

    Arguments:
        model: s(x̃, σ) on the [0, 1] pixel scale, e.g. :class:`dgmood.models.network.ScoreNet` (its ``forward`` is the score).
        n: Number of images.
        steps: Nonzero σ values of the grid (EDM: 18).
        sigma_max, sigma_min: Ends of the grid, pixel scale (EDM and our training: 80 and 0.002).
        rho: Grid exponent ρ of eq. 5.
        generator: Source of ε (CPU); None uses torch's global generator.
        batch_size: Images per network call.
        device: Where ``model`` runs.
        shape: Shape of one image, default ``model.config.image_shape``.
        center: Mean of the start; 0.5 is the middle of the pixel range.
        clamp: Clip the result to [0, 1].

    Returns:
        float32 array of shape (n, *shape), in [0, 1] when ``clamp``.
    """
    if n < 0 or batch_size < 1 or steps < 1:
        raise ValueError(f"need n >= 0, batch_size >= 1 and steps >= 1, got n={n}, batch_size={batch_size}, "
                         f"steps={steps}")
    shape = tuple(shape if shape is not None else model.config.image_shape)
    sigmas = karras_sigmas(sigma_max, sigma_min, steps, rho)
    start = center + sigma_max * torch.randn((n, *shape), generator=generator)
    out = [heun_sampler(model, batch.to(device), sigmas).cpu() for batch in start.split(batch_size) if len(batch)]
    x = torch.cat(out) if out else start
    return (x.clamp(0, 1) if clamp else x).numpy().astype(np.float32)
