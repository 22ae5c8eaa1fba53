"""The score model as a VP diffusion: PF-ODE likelihood, FLIPD and normal-bundle LID, baselines (METHODS §3)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from zuko.utils import odeint

from dgmood.models.noise import BETA_MAX, BETA_MIN, t_to_sigma, vp_score

__all__ = [
    "RECONSTRUCTION_SIGMAS",
    "SOLVERS",
    "difference_trace",
    "flipd",
    "karras_sigmas",
    "normal_bundle_lid",
    "pf_ode_log_likelihood",
    "reconstruction_error",
    "score_norm",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

RECONSTRUCTION_SIGMAS = (0.1, 0.2, 0.4, 0.8, 1.6)
"""Pixel-scale noise levels of :func:`reconstruction_error`: σ = 0.1 edits textures, σ = 1.6 (VP t ≈ 0.49)
regenerates most of the image."""


# --- shared pieces ----------------------------------------------------------------------------------------------


def sigma_like(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ broadcast to shape (N,) in the dtype and device of x."""
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


class ImageNoise:
    """A noise source seeded by each image's content: image i's draws come from its own generator, seeded by
    (``seed``, SHA-256 of its float32 bytes), so its Monte-Carlo statistics (FLIPD's probes, the reconstruction's
    ε) are the same in any batch, at any position, alone or twice. Pass it where a ``generator`` is taken.

    Args:
        x: The images (N, ...) the noise is for.
        seed: Seed mixed into every image's.
    """

    def __init__(self, x: torch.Tensor, seed: int = 0):
        import hashlib

        rows = x.detach().to("cpu", torch.float32).contiguous().numpy()
        self.generators = [torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:7], "little") ^ int(seed)) for r in rows]

    def draw(self, kind: str, per_image: tuple[int, ...], axis: int, dtype, device) -> torch.Tensor:
        """``randn`` or ``rademacher`` draws of shape ``per_image`` for each image, stacked along ``axis``."""
        draws = [torch.randn(per_image, generator=g, dtype=dtype) if kind == "gaussian"
                 else torch.randint(0, 2, per_image, generator=g).to(dtype) * 2 - 1 for g in self.generators]
        return torch.stack(draws, dim=axis).to(device)


def _draw_probes(shape, probe: str, generator, dtype, device) -> torch.Tensor:
    """Hutchinson probes v with E[v vᵀ] = I: Rademacher (±1) or standard Gaussian; shape (probes, N, ...)."""
    if isinstance(generator, ImageNoise) and probe in ("rademacher", "gaussian"):
        return generator.draw(probe, (shape[0], *shape[2:]), 1, dtype, device)
    if probe == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
    if probe == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")


def _vjp(out: torch.Tensor, inp: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vᵀ ∂out/∂inp per sample (samples must not interact, e.g. no BatchNorm in train mode)."""
    (g,) = torch.autograd.grad(out, inp, v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def _jacobian_trace(out: torch.Tensor, inp: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """tr ∂out/∂inp per sample, shape (N,): Hutchinson mean of vᵀJv over probes of shape (P, *inp.shape),
    or exact (D vector–Jacobian products over the basis vectors) when ``probes`` is None."""
    if probes is not None:
        return torch.stack([(_vjp(out, inp, v) * v).flatten(1).sum(1) for v in probes]).mean(0)
    n, d = inp.shape[0], inp[0].numel()
    trace = inp.new_zeros(n)
    for i in range(d):
        e = inp.new_zeros(n, d)
        e[:, i] = 1
        trace = trace + _vjp(out, inp, e.view_as(inp)).flatten(1)[:, i]
    return trace


def _beta(t: float) -> float:
    """β(t) = β_min + t (β_max − β_min), the VP-SDE's linear schedule (METHODS §1)."""
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


# --- likelihood -------------------------------------------------------------------------------------------------


def _pf_ode_field(score_fn: ScoreFn, y: torch.Tensor, t: float, probes: torch.Tensor | None):
    """Drift of the probability-flow ODE and its divergence at diffusion state y of shape (N, ...), t in (0, 1].

    dy/dt = f(y, t) − ½ g(t)² ∇ log p_t(y) = −½ β(t) (y + ∇ log p_t(y))   (Song et al. 2021, eq. 13), so
    ∇·(dy/dt) = −½ β(t) (D + tr ∇_y ∇ log p_t(y)), the trace exact or by Hutchinson (vᵀJv via a vjp).
    """
    beta = _beta(t)
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        score = vp_score(score_fn, y, t)
        trace = _jacobian_trace(score, y, probes)
    drift = -0.5 * beta * (y + score)
    divergence = -0.5 * beta * (y[0].numel() + trace)
    return drift.detach(), divergence.detach()


def _time_grid(t_eps: float, steps: int, spacing: str) -> list[float]:
    """``steps + 1`` times from t_eps to 1, uniform or geometric."""
    if spacing == "uniform":
        return torch.linspace(t_eps, 1.0, steps + 1, dtype=torch.float64).tolist()
    return torch.logspace(math.log10(t_eps), 0.0, steps + 1, dtype=torch.float64).tolist()


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample, shape (N,)."""
    return -0.5 * z.flatten(1).square().sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)


SOLVERS = ("euler", "heun", "adaptive")
"""PF-ODE solvers of :func:`pf_ode_log_likelihood`."""


def pf_ode_log_likelihood(
    score_fn: ScoreFn,
    x: torch.Tensor,
    t_eps: float = 1e-2,
    steps: int = 25,
    probes: int = 1,
    probe: str = "rademacher",
    solver: str = "euler",
    spacing: str = "uniform",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> dict:
    r"""Log-likelihood of images under the VP diffusion by the probability-flow ODE (METHODS §3).

    The images are mapped to the diffusion's scale, y = 2x − 1 ∈ [−1, 1]^D, and the ODE
    dy/dt = −½ β(t) (y + ∇ log p_t(y)) is integrated from t_eps to 1 with the instantaneous
    change of variables (Song et al. 2021, eq. 39; Chen et al. 2018):

    .. math:: \log p_{t_\epsilon}(y_{t_\epsilon}) = \log \mathcal{N}(y_1; 0, I)
              + \int_{t_\epsilon}^1 \nabla \cdot \tilde f(y_t, t)\, dt .

    Small-time approximation (as in the paper and score_sde): the ODE starts at y_{t_eps} = y itself,
    so the result is log p_{t_eps}(y), the density of α y_0 + sqrt(1 − α²) ε (α = α_{t_eps}) at y,
    which approximates log p_0(y) up to smoothing at pixel scale σ(t_eps) (0.022 for t_eps = 1e-2).

    Units: log p on [0, 1] pixels is log p_[−1,1](2x − 1) + D log 2 (Jacobian of y = 2x − 1). For 8-bit
    images with uniform dequantisation (x + u/256), a bin of width 1/256 per pixel has probability
    ≈ p_[0,1](x) / 256^D, hence bpd = (−log p_[0,1](x) + D log 256) / (D log 2) = −log p_[−1,1] / (D log 2) + 7.
    (Pixels stored as k/255 make the bins 1/255 wide; the convention above, shared with score_sde,
    ignores that D log(256/255) ≈ 0.0056 bit/dim.)

    Arguments:
        score_fn: s(x̃, σ) on the [0, 1] pixel scale: (x̃ of shape (N, C, H, W), σ of shape (N,)) → shape of x̃.
            Samples must be processed independently (vjps are taken on the batch sum).
        x: Images, shape (N, C, H, W), pixel scale [0, 1].
        t_eps: Start time of the ODE; the paper's code 1e-2, the authors' newer code 1e-4.
        steps: Fixed steps of the Euler or Heun solver (the paper: 25 Euler steps). Ignored by the adaptive one.
        probes: Hutchinson probes per image, drawn once and fixed for the whole solve (the paper: 25).
        probe: ``"rademacher"``, ``"gaussian"``, or ``"exact"`` for the exact divergence (D vjps per step).
        solver: ``"euler"`` (fixed steps, one evaluation each), ``"heun"`` (fixed steps of the explicit
            trapezoidal rule, eq. H1 of :func:`_fixed_steps`: two evaluations each, second order) or ``"adaptive"`` (Dormand–Prince 5(4) of :func:`zuko.utils.odeint`;
            one step size is shared by the whole batch, controlled by the worst sample).
        spacing: Euler grid, ``"uniform"`` in t (the paper) or ``"geometric"`` in t, which puts more steps near
            t_eps, where the field is stiff for data near a manifold: on Gaussians with pixel std 3e-3 it cuts the
            25-step error from 2 to 0.4 nat/dim.
        rtol, atol: Tolerances of the adaptive solver, on y and the accumulated divergence.
        generator: Source of the probes.

    Returns:
        dict with ``nats``: log p_[0,1](x) in nats per image, shape (N,) (log-likelihood: higher = more
        in-distribution); ``bpd``: negative log-likelihood in bits per dimension on the 8-bit scale, shape (N,)
        (lower = more in-distribution); ``nfe``: number of score_fn evaluations (int).

    References:
        | Score-Based Generative Modeling through SDEs (Song et al., 2021), https://arxiv.org/abs/2011.13456
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if spacing not in ("uniform", "geometric"):
        raise ValueError(f"spacing must be 'uniform' or 'geometric', got {spacing!r}")
    if not 0 < t_eps < 1:
        raise ValueError(f"need 0 < t_eps < 1, got {t_eps}")
    x = x.detach()
    y = 2 * x - 1
    v = None if probe == "exact" else _draw_probes((probes, *x.shape), probe, generator, x.dtype, x.device)
    nfe = 0

    def field(t, y, _delta):
        nonlocal nfe
        nfe += 1
        return _pf_ode_field(score_fn, y, float(t), v)

    if solver in ("euler", "heun"):
        y, delta = _fixed_steps(field, y, x.new_zeros(x.shape[0]), _time_grid(t_eps, steps, spacing), solver)
    else:
        with torch.no_grad():  # no adjoint: zuko stores no checkpoints when grad is off
            y, delta = odeint(field, (y, x.new_zeros(x.shape[0])), t_eps, 1.0, atol=atol, rtol=rtol)
    d = x[0].numel()
    nats = _standard_normal_log_prob(y) + delta + d * math.log(2)
    bpd = (-nats + d * math.log(256)) / (d * math.log(2))
    return {"nats": nats, "bpd": bpd, "nfe": nfe}


def _fixed_steps(field, y, delta, ts, solver: str):
    """Integrate (y, δ) over the grid ``ts`` with the drift and divergence ``field(t, y, δ)``.

    Euler: y ← y + h f(t₀, y). Heun (eq. H1, explicit trapezoidal): ỹ = y + h f(t₀, y),
    y ← y + h/2 (f(t₀, y) + f(t₁, ỹ)), and δ likewise with the divergences at the same two points.
    """
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        drift, divergence = field(t0, y, delta)
        if solver == "heun":
            drift1, divergence1 = field(t1, y + h * drift, delta)
            drift, divergence = (drift + drift1) / 2, (divergence + divergence1) / 2
        y, delta = y + h * drift, delta + h * divergence
    return y, delta


# --- local intrinsic dimension ------------------------------------------------------------------------------------


def flipd(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigma0: float,
    probes: int = 1,
    exact: bool = False,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    difference: float | None = None,
) -> torch.Tensor:
    r"""FLIPD estimate of the local intrinsic dimension (Kamkari et al. 2024; METHODS §3).

    From the Fokker–Planck equation of Gaussian smoothing, ∂ log q_σ(x) / ∂ log σ = σ² (tr ∇ₓs + ‖s‖²),
    and log q_σ(x) ≈ (LID − D) log σ + c as σ → 0, so

    .. math:: \mathrm{LID}(x; \sigma_0) \approx D + \sigma_0^2 \left(\operatorname{tr} \nabla_x s(x, \sigma_0)
              + \|s(x, \sigma_0)\|^2\right).

    Arguments:
        score_fn: s(x̃, σ) on the [0, 1] pixel scale, as in :func:`pf_ode_log_likelihood`.
        x: Images, shape (N, C, H, W), pixel scale.
        sigma0: Noise level on the pixel scale (a VP time t0 converts by :func:`dgmood.models.noise.t_to_sigma`).
        probes: Hutchinson probes per image (cost: one network call, then one vjp per probe).
        exact: Exact trace by D vjps instead (fine for small D).
        probe: ``"rademacher"`` or ``"gaussian"``.
        generator: Source of the probes.
        difference: None: the trace by autograd; a number r: by central differences of step r·σ₀
            (:func:`difference_trace`, forward passes only; not with ``exact``).

    Returns:
        Tensor of shape (N,): the LID estimate (a real number; not clipped to [0, D]).

    References:
        | A Geometric View of Data Complexity (Kamkari et al., NeurIPS 2024), https://arxiv.org/abs/2406.03537
    """
    x = x.detach()
    v = None if exact else _draw_probes((probes, *x.shape), probe, generator, x.dtype, x.device)
    if difference is not None and v is not None:
        trace, squared_norm = difference_trace(score_fn, x, sigma0, v, difference * sigma0)
        return x[0].numel() + sigma0**2 * (trace + squared_norm)
    with torch.enable_grad():
        xg = x.requires_grad_(True)
        score = score_fn(xg, sigma_like(x, sigma0))
        trace = _jacobian_trace(score, xg, v)
    return (x[0].numel() + sigma0**2 * (trace + score.flatten(1).square().sum(1))).detach()


@torch.no_grad()
def difference_trace(score_fn: ScoreFn, x: torch.Tensor, sigma: float, probes: torch.Tensor,
                     step: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Hutchinson trace of ∇ₓs(x, σ) by central differences, and ‖s(x, σ)‖², from forward passes only.

    .. math:: v^\top \nabla_x s\, v \approx v^\top \frac{s(x + h v) - s(x - h v)}{2h}, \qquad
              s(x) \approx \tfrac12 \left(s(x + h v) + s(x - h v)\right),

    both exact up to O(h²) (the same probe v as the autograd trace, so the two estimates differ by O(h²), not by
    Hutchinson noise). Cost: two network calls per probe without a graph, against one forward pass with a graph
    and one vector–Jacobian product per probe.

    Arguments:
        score_fn: s(x̃, σ), pixel scale.
        x: Images (N, C, H, W).
        sigma: Noise level, pixel scale.
        probes: (P, N, C, H, W) Hutchinson probes.
        step: h, pixel scale (e.g. 1 % of σ).

    Returns:
        (trace, squared score norm), each (N,), the means over the probes.
    """
    traces, norms = [], []
    sig = sigma_like(x, sigma).repeat(2)
    for v in probes:
        plus, minus = score_fn(torch.cat([x + step * v, x - step * v]), sig).chunk(2)
        traces.append(((plus - minus) * v).flatten(1).sum(1) / (2 * step))
        norms.append((0.5 * (plus + minus)).flatten(1).square().sum(1))
    return torch.stack(traces).mean(0), torch.stack(norms).mean(0)


def _largest_gap_normal_dim(singular_values: torch.Tensor) -> torch.Tensor:
    """Normal-space dimension by the largest drop s_i − s_{i+1} of the descending singular values, shape (N,).

    Linear differences, as in Stanczuk et al.'s and Kamkari et al.'s code; the result lies in [1, r − 1]."""
    return (singular_values[:, :-1] - singular_values[:, 1:]).argmax(dim=1) + 1


@torch.no_grad()
def normal_bundle_lid(
    score_fn: ScoreFn,
    x: torch.Tensor,
    t0: float = 0.01,
    sigma0: float | None = None,
    n_perturb: int | None = None,
    tau: float | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-bundle LID estimate (Stanczuk et al. 2024, Algorithm 1; METHODS §3).

    At a small noise level the score points back to the data manifold, so the scores at K perturbations
    x + σ ε_k of x span its normal space. Stacking them as a D × K matrix, LID = D − #{singular values > τ}.
    Without τ, the normal dimension is where the descending singular values drop the most (largest-gap rule,
    linear differences as in the authors' code); that rule always returns an LID in [D − r + 1, D − 1],
    r = min(D, K). Caveat: the mean of the K scores (≈ the score at x) adds one dominant singular value when x
    is off the manifold or the density varies along it; on 28×28 images the largest drop then follows the first
    value and the rule says D − 1 for every image. Pass a τ tuned on training data (METHODS §3) for images.

    The scores are the pixel-scale s(x̃, σ), units 1/pixel; the VP model's ∇ log p_{t0} is s / (2 α_{t0}),
    so a τ tuned on the VP scale divides by 2 α_{t0} ≈ 2 here. Memory: N·K·D numbers.

    Arguments:
        score_fn: s(x̃, σ) on the [0, 1] pixel scale, as in :func:`pf_ode_log_likelihood`.
        x: Images, shape (N, C, H, W), pixel scale.
        t0: VP time of the perturbation (the paper: 0.01), i.e. σ = t_to_sigma(t0) on the pixel scale.
        sigma0: Pixel-scale noise level; overrides t0 when given.
        n_perturb: K, perturbations per image; default 4·D (the authors' code) capped at max(D, 1024), so at least
            D (every normal direction can show) and at most 1024 network calls per image for D ≤ 1024.
        tau: Singular-value threshold, units of the score (1/pixel); None for the largest-gap rule.
        batch_size: Perturbed images per score_fn call.
        generator: Source of the perturbations.

    Returns:
        (lid, singular_values): shapes (N,) (integer values in the dtype of x) and (N, min(D, K)), descending.

    References:
        | Diffusion Models Encode the Intrinsic Dimension of Data Manifolds (Stanczuk et al., ICML 2024),
        | https://arxiv.org/abs/2212.12611
    """
    n, d = x.shape[0], x[0].numel()
    k = n_perturb if n_perturb is not None else min(4 * d, max(d, 1024))
    sigma = float(t_to_sigma(t0)) if sigma0 is None else float(sigma0)
    owner = torch.arange(n, device=x.device).repeat_interleave(k)
    scores = []
    for idx in owner.split(batch_size):
        eps = torch.randn((len(idx), *x.shape[1:]), generator=generator, dtype=x.dtype, device=x.device)
        x_tilde = x[idx] + sigma * eps
        scores.append(score_fn(x_tilde, sigma_like(x_tilde, sigma)).flatten(1))
    matrix = torch.cat(scores).view(n, k, d)  # transposed D × K stack: same singular values
    singular_values = torch.linalg.svdvals(matrix)
    normal_dim = _largest_gap_normal_dim(singular_values) if tau is None else (singular_values > tau).sum(1)
    return (d - normal_dim).to(x.dtype), singular_values


# --- baselines ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_norm(score_fn: ScoreFn, x: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """Baseline ‖s(x, σ_min)‖₂ over all pixels (METHODS §3), shape (N,), units 1/pixel (higher = more OOD)."""
    return score_fn(x, sigma_like(x, sigma_min)).flatten(1).norm(dim=1)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> list[float]:
    """EDM's σ grid σ_max → σ_min in ``steps`` points, ρ-spaced (Karras et al. 2022, eq. 5), then 0."""
    if steps < 2 or sigma_max <= sigma_min:
        return [sigma_max, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)] + [0.0]


def _pf_ode_denoise(score_fn: ScoreFn, x: torch.Tensor, sigma: float, steps: int, sigma_min: float) -> torch.Tensor:
    """Euler solve of EDM's probability-flow ODE dx/dσ = −σ s(x, σ) from σ to 0 (Karras et al. 2022, eq. 4 and
    Algorithm 1 without the Heun correction); the last step, to σ = 0, is Tweedie's denoiser x + σ² s."""
    grid = karras_sigmas(sigma, sigma_min, steps)
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        x = x + (s_next - s_cur) * (-s_cur * score_fn(x, sigma_like(x, s_cur)))
    return x


@torch.no_grad()
def reconstruction_error(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: Sequence[float] = RECONSTRUCTION_SIGMAS,
    steps: int = 10,
    sigma_min: float = 2e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Diffusion reconstruction error (Graham et al. 2023; METHODS §3): noise, denoise deterministically, compare.

    For every level σ: x_σ = x + σ ε with one ε ~ N(0, I) per image, drawn once and shared by all levels,
    then ``steps`` Euler steps of the probability-flow ODE on EDM's ρ = 7 grid from σ down to ``sigma_min``,
    and a final step to 0.

    Arguments:
        score_fn: s(x̃, σ) on the [0, 1] pixel scale.
        x: Images, shape (N, C, H, W), pixel scale.
        sigmas: Noise levels, pixel scale (a VP time t converts by :func:`dgmood.models.noise.t_to_sigma`).
        steps: Euler steps per level (network calls per image and level).
        sigma_min: Smallest nonzero σ of the grid.
        generator: Source of ε (a torch.Generator, or an :class:`ImageNoise`).

    Returns:
        Tensor of shape (N, len(sigmas)): mean squared error per pixel, pixel² units (higher = more OOD).
    """
    if isinstance(generator, ImageNoise):
        eps = generator.draw("gaussian", tuple(x.shape[1:]), 0, x.dtype, x.device)
    else:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    errors = [
        (_pf_ode_denoise(score_fn, x + sigma * eps, float(sigma), steps, sigma_min) - x).flatten(1).square().mean(1)
        for sigma in sigmas
    ]
    return torch.stack(errors, dim=1)
