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
