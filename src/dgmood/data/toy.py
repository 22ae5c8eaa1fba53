"""Toy data of known local intrinsic dimension: the 2-D lollipop and linearly embedded Gaussians."""

from __future__ import annotations

import numpy as np

__all__ = ["LOLLIPOP_CENTRE", "LOLLIPOP_DOT", "LOLLIPOP_JUNCTION", "LOLLIPOP_RADIUS", "LOLLIPOP_STICK_END",
           "embedded_gaussian", "lollipop"]

LOLLIPOP_CENTRE = np.array([3.0, 3.0])
LOLLIPOP_RADIUS = 1.0
LOLLIPOP_STICK_END = np.array([1.5, 1.5])
LOLLIPOP_JUNCTION = LOLLIPOP_CENTRE - LOLLIPOP_RADIUS / np.sqrt(2.0)
LOLLIPOP_DOT = np.array([0.0, 0.0])
_LOLLIPOP_WEIGHTS = np.array([4.0, 2.0, 1.0]) / 7.0


def lollipop(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample the 2-D lollipop: a disc (LID 2), a stick (LID 1) and an isolated dot (LID 0).

    The geometry and mixture weights are those of the dual-threshold authors' code (Kamkari et al.
    2024, appendix C, after Tempczyk et al. 2022): each point is the candy with probability 4/7,
    the stick with 2/7, the dot with 1/7.

    - candy: uniform on the closed disc of centre (3, 3) and radius 1;
    - stick: uniform on the segment from (1.5, 1.5) to the junction (3 - 1/√2, 3 - 1/√2), the point
      where the diagonal meets the disc's edge (length √2 · (1.5 - 1/√2) ≈ 1.12);
    - dot: every dot sample is exactly (0, 0), at distance ≈ 2.1 from the stick's free end.

    Arguments:
        n: number of points.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(X, lid)``: ``X`` float64 of shape (n, 2) and the true LID, int64 of shape (n,), in {0, 1, 2}.
    """
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    rng = np.random.default_rng(seed)
    part = rng.choice(3, size=n, p=_LOLLIPOP_WEIGHTS)
    radius = LOLLIPOP_RADIUS * np.sqrt(rng.random(n))
    angle = 2.0 * np.pi * rng.random(n)
    candy = LOLLIPOP_CENTRE + radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    t = rng.random(n)[:, None]
    stick = LOLLIPOP_STICK_END + t * (LOLLIPOP_JUNCTION - LOLLIPOP_STICK_END)
    dot = np.broadcast_to(LOLLIPOP_DOT, (n, 2))
    X = np.choose(part[:, None], [candy, stick, dot])
    return X, (2 - part).astype(np.int64)


def embedded_gaussian(n: int, d: int, ambient: int, seed: int = 0, rotate: bool = False) -> np.ndarray:
    """Sample N(0, I_d) and embed it in R^ambient by repeating coordinates (dual-threshold appendix C).

    Ambient coordinate j is latent coordinate ``j mod d``, so the data lie on a d-dimensional linear
    subspace and every point has LID d. With ``rotate`` the result is multiplied by a random
    orthogonal ambient matrix (Haar, from the QR of a Gaussian matrix), which hides the repetition
    without changing any distance.

    Arguments:
        n: number of points.
        d: intrinsic dimension, ``1 <= d <= ambient``.
        ambient: ambient dimension.
        seed: seed of ``numpy.random.default_rng``.
        rotate: whether to apply the random rotation.

    Returns:
        float64 array of shape (n, ambient).
    """
    if n < 1 or not 1 <= d <= ambient:
        raise ValueError(f"need n >= 1 and 1 <= d <= ambient, got n={n}, d={d}, ambient={ambient}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))[:, np.arange(ambient) % d]
    if rotate:
        q, r = np.linalg.qr(rng.standard_normal((ambient, ambient)))
        X = X @ (q * np.sign(np.diag(r)))
    return X


# ----------------------------------------------------------------------------- MSMA 1-D toy (Section 2.1, Figs. 2-3)

__all__ += ["MSMA_TOY_MEANS", "MSMA_TOY_POINTS", "MSMA_TOY_SIGMAS", "MSMA_TOY_STDS", "MSMA_TOY_WEIGHTS",
            "smoothed_mixture_log_density", "smoothed_mixture_score", "smoothed_mixture_score_norm"]

# Our choice of the toy density (MSMA gives no numbers): a heavy inlier mode N(10, 2²) and a light
# local mode N(50, 2²) far from it, so x = 30 lies in a low-density valley between the two.
MSMA_TOY_WEIGHTS = np.array([0.9, 0.1])
MSMA_TOY_MEANS = np.array([10.0, 50.0])
MSMA_TOY_STDS = np.array([2.0, 2.0])
# σ_L, σ_M, σ_H of MSMA Figs. 2-3 (METHODS §2 item 4).
MSMA_TOY_SIGMAS = np.array([0.1, 10.0, 20.0])
# The three points the figures discuss.
MSMA_TOY_POINTS = {"inlier": 10.0, "low-density outlier": 30.0, "local-mode outlier": 50.0}


def _smoothed_components(x, sigma, weights, means, stds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-component log w_k + log N(x; μ_k, s_k² + σ²), the means and the smoothed variances.

    Returns:
        ``(log_terms, means, variances)``: log_terms of shape x.shape + (K,), the others (K,).
    """
    w, mu, s = (np.asarray(a, dtype=np.float64).ravel() for a in (weights, means, stds))
    if not (len(w) == len(mu) == len(s) >= 1):
        raise ValueError(f"weights, means and stds need one equal length, got {len(w)}, {len(mu)}, {len(s)}")
    if np.any(w <= 0) or not np.isclose(w.sum(), 1.0) or np.any(s <= 0) or not np.all(np.isfinite(mu)):
        raise ValueError("need positive weights summing to 1, positive stds and finite means")
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    var = s**2 + float(sigma) ** 2  # smoothing by N(0, σ²) adds σ² to each variance
    x = np.asarray(x, dtype=np.float64)[..., None]
    log_terms = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mu) ** 2 / var
    return log_terms, mu, var


def smoothed_mixture_log_density(x, sigma: float, weights=MSMA_TOY_WEIGHTS, means=MSMA_TOY_MEANS,
                                 stds=MSMA_TOY_STDS) -> np.ndarray:
    """log p_σ(x) of a 1-D Gaussian mixture convolved with N(0, σ²) (MSMA §2.1, Fig. 2).

    p_σ(x) = Σ_k w_k N(x; μ_k, s_k² + σ²); σ = 0 gives the mixture itself.

    Arguments:
        x: Points, any shape (units of x).
        sigma: Smoothing noise level σ >= 0 (units of x).
        weights, means, stds: The K mixture weights (positive, sum 1), means and standard deviations.

    Returns:
        float64 array of x's shape, log density in nats per unit of x.
    """
    log_terms, _, _ = _smoothed_components(x, sigma, weights, means, stds)
    top = log_terms.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(log_terms - top).sum(axis=-1, keepdims=True)))[..., 0]


def smoothed_mixture_score(x, sigma: float, weights=MSMA_TOY_WEIGHTS, means=MSMA_TOY_MEANS,
                           stds=MSMA_TOY_STDS) -> np.ndarray:
    """The score ∂ₓ log p_σ(x) = Σ_k r_k(x) (μ_k − x) / (s_k² + σ²), r_k the posterior weights (MSMA §2.1).

    Arguments and shapes as :func:`smoothed_mixture_log_density`; returns 1/units of x.
    """
    log_terms, mu, var = _smoothed_components(x, sigma, weights, means, stds)
    r = np.exp(log_terms - log_terms.max(axis=-1, keepdims=True))
    r /= r.sum(axis=-1, keepdims=True)
    return (r * (mu - np.asarray(x, dtype=np.float64)[..., None]) / var).sum(axis=-1)


def smoothed_mixture_score_norm(x, sigma: float, weights=MSMA_TOY_WEIGHTS, means=MSMA_TOY_MEANS,
                                stds=MSMA_TOY_STDS) -> np.ndarray:
    """MSMA's feature |σ · ∂ₓ log p_σ(x)| in 1-D (MSMA §3, eq. 4; Fig. 3): dimensionless, of x's shape."""
    return np.abs(float(sigma) * smoothed_mixture_score(x, sigma, weights, means, stds))
