"""Calibration of the LID estimators from training data alone (METHODS §3, "Choosing τ (or σ₀)").

The dual-threshold method never sees OOD data. Its LID estimator has one free parameter — the singular-value
threshold τ of the flow-Jacobian and normal-bundle estimators, or the noise level σ₀ of FLIPD — and it is set so
that the model's mean LID over 80 random training points matches a model-free target: the mean LPCA LID of the
training set (:func:`target_lid`).

- τ: the mean count #{s > τ} is a step function of τ, so :func:`calibrate_tau` solves it exactly by sorting the
  singular values (the authors binary-searched log τ in [−20, 20] with 20 steps instead).
- σ₀: :func:`calibrate_sigma0` bisects log σ₀; FLIPD's mean LID decreases with σ₀ (from D at σ₀ → 0 to 0 as
  σ₀ → ∞), which is checked along the way. A VP time t₀ follows from :func:`dgmood.models.noise.sigma_to_t`.

:class:`Calibration` records the result as JSON-friendly data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch

from dgmood.statistics.lpca import mean_lpca

__all__ = [
    "CALIBRATION_POINTS",
    "Calibration",
    "bisect_log",
    "calibrate_sigma0",
    "calibrate_tau",
    "calibration_points",
    "first_crossing",
    "mean_lid_at_tau",
    "target_lid",
]

CALIBRATION_POINTS = 80
"""Training points whose mean LID is matched to the target (the authors' choice, METHODS §3)."""

_KINDS = ("flow", "normal_bundle")


# --- the target ---------------------------------------------------------------------------------------------------


def target_lid(
    train_images,
    n_neighbors: int = 1000,
    n_queries: int | None = 200,
    seed: int = 0,
    alpha_fo: float = 0.001,
    **kwargs,
) -> float:
    """The calibration target: mean LPCA LID over (a random subset of) the training set (METHODS §3).

    Each query's neighbourhood is its ``n_neighbors`` nearest training images (itself left out), and the
    Fukunaga–Olsen rule with α = ``alpha_fo`` counts its dimensions (:func:`dgmood.statistics.lpca.mean_lpca`).

    Defaults and cost: k = 1000 and α = 0.001 are the authors' settings and change the target, so keep them
    unless the training set is small (k must be at most n − 1). Only the number of queries is cut: at D = 784
    one query costs ~0.1 s on a CPU core (a k × D neighbourhood and a D × D eigen-decomposition; 1000
    queries took ~110 s), so the default 200 queries take ~20 s plus a brute-force neighbour search of
    200 × n distances. The mean over 200 queries is a sample mean with standard error std/√200: on the 10 000
    test images of Fashion-MNIST and MNIST (k = 1000) the pointwise LPCA has std ≈ 25 and ≈ 35 around a mean
    of ≈ 224, so the 200-query target is within ≈ ±2–2.5 (one standard error) of the full mean.

    Arguments:
        train_images: Training set, shape (n, C, H, W) or (n, D), any scale (LPCA is scale-free).
        n_neighbors: Neighbourhood size k, at most n − 1.
        n_queries: Points averaged over, drawn without replacement; None: all n (slow for n = 60000).
        seed: Seed of the draw.
        alpha_fo: Fukunaga–Olsen relative threshold in (0, 1).
        **kwargs: ``batch_size``, ``device``, ``dtype`` of :func:`dgmood.statistics.lpca.lpca`.

    Returns:
        The mean LID, a float in [0, min(k, D)].
    """
    x = np.asarray(train_images)
    if x.ndim < 2:
        raise ValueError(f"train_images must have shape (n, ...) with at least 2 axes, got {x.shape}")
    return mean_lpca(x.reshape(len(x), -1), n_neighbors, alpha_fo, n_queries=n_queries, seed=seed, **kwargs)


def calibration_points(n_train: int, n: int = CALIBRATION_POINTS, seed: int = 0) -> np.ndarray:
    """Indices of the ``n`` random training points whose mean LID is matched to the target (METHODS §3).

    Returns:
        int64 array of shape (n,), distinct, ascending, in [0, n_train); drawn by ``numpy.random.default_rng(seed)``.
    """
    if n < 1 or n_train < 1:
        raise ValueError(f"need n >= 1 and n_train >= 1, got n={n}, n_train={n_train}")
    if n > n_train:
        raise ValueError(f"cannot draw n={n} calibration points from {n_train} training points; pass n <= {n_train}")
    return np.sort(np.random.default_rng(seed).choice(n_train, size=n, replace=False)).astype(np.int64)


# --- τ: exact -----------------------------------------------------------------------------------------------------


def _as_singular_values(singular_values) -> np.ndarray:
    """Singular values as a float64 array of shape (N, r), finite."""
    s = singular_values.detach().cpu().numpy() if isinstance(singular_values, torch.Tensor) else singular_values
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"singular_values must have shape (N, r) with N, r >= 1, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("singular_values contain NaN or inf; drop those points before calibrating")
    return s


def _check_kind(kind: str, r: int, dim: int | None) -> int:
    """The ambient dimension D of a normal-bundle calibration (default r); 0 for the flow."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'flow' (LID = #{{s > τ}}) or 'normal_bundle' (LID = D − #{{s > τ}}), "
                         f"got {kind!r}")
    if kind == "flow":
        return 0
    d = r if dim is None else int(dim)
    if d < r:
        raise ValueError(f"dim={d} is below the {r} singular values per point; pass the ambient dimension D")
    return d


def mean_lid_at_tau(singular_values, tau: float, kind: str = "flow", dim: int | None = None) -> float:
    """Mean LID over the points at threshold τ (METHODS §3).

    Arguments:
        singular_values: shape (N, r), numpy or torch: the generator-Jacobian singular values of the flow
            (:func:`dgmood.models.flow.jacobian_singular_values`) or the score-matrix singular values of the normal
            bundle (:func:`dgmood.models.diffusion.normal_bundle_lid`), in that estimator's units.
        tau: Threshold, same units.
        kind: ``"flow"``: LID = #{s > τ}; ``"normal_bundle"``: LID = D − #{s > τ}.
        dim: D of the normal bundle (default r, right when K ≥ D perturbations were used); unused for the flow.

    Returns:
        The mean LID, a float.
    """
    s = _as_singular_values(singular_values)
    d = _check_kind(kind, s.shape[1], dim)
    count = float((s > tau).sum(axis=1).mean())
    return count if kind == "flow" else d - count


def _between(lo: float, hi: float) -> float:
    """A threshold in [lo, hi) for distinct lo < hi: geometric mean, or midpoint at 0; lo itself should rounding put
    the mean on hi (values an ulp apart), since #{s > lo} is the count of the whole step."""
    t = math.sqrt(lo * hi) if lo > 0 else 0.5 * (lo + hi)
    return t if lo <= t < hi else lo


def calibrate_tau(singular_values, target: float, kind: str = "flow", dim: int | None = None) -> float:
    """Exact τ whose mean LID over the points is closest to ``target`` (METHODS §3).

    The mean count c(τ) = mean_i #{s_ij > τ} is a non-increasing step function, constant on [u_j, u_{j+1})
    between consecutive distinct singular values u_1 < … < u_m. Every value it takes is tried, and τ is
    returned inside the winning step, away from both edges so that new points are not decided by rounding:
    the geometric mean √(u_j u_{j+1}) (arithmetic when u_j = 0), u_1 / 2 below the smallest value (0.5·u_1 − 1
    when u_1 ≤ 0), 2·u_m above the largest (u_m + 1 when u_m ≤ 0).

    Ties: when two steps are equally close to the target (within 1e-9, e.g. target 3.5 between means 3 and 4),
    the larger τ wins, i.e. the one that counts fewer singular values as significant.

    Arguments:
        singular_values: shape (N, r), numpy or torch, of the N calibration points (e.g. the 80 of
            :func:`calibration_points`).
        target: The mean LID to match, e.g. :func:`target_lid`.
        kind: ``"flow"``: LID = #{s > τ}; ``"normal_bundle"``: LID = D − #{s > τ}.
        dim: D of the normal bundle (default r); unused for the flow.

    Returns:
        τ, in the units of the singular values. :func:`mean_lid_at_tau` gives the mean LID it achieves.
    """
    s = _as_singular_values(singular_values)
    d = _check_kind(kind, s.shape[1], dim)
    if not math.isfinite(target):
        raise ValueError(f"target must be a finite mean LID, got {target!r}")
    values, counts = np.unique(s, return_counts=True)  # ascending, distinct
    n = s.shape[0]
    above = s.size - np.concatenate([[0], np.cumsum(counts)])  # #{s > τ} on each of the m + 1 steps
    mean = above / n if kind == "flow" else d - above / n
    error = np.abs(mean - target)
    step = int(np.flatnonzero(error <= error.min() + 1e-9).max())  # ties: the largest τ
    if step == 0:
        return 0.5 * values[0] if values[0] > 0 else 0.5 * values[0] - 1.0
    if step == len(values):
        return 2.0 * values[-1] if values[-1] > 0 else values[-1] + 1.0
    return _between(values[step - 1], values[step])


# --- σ₀: bisection ------------------------------------------------------------------------------------------------


def bisect_log(
    fn: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    tol: float = 0.1,
    max_iter: int = 40,
    check_monotone: bool = True,
    name: str = "x",
) -> tuple[float, float]:
    """Bisection in log x for fn(x) = target, fn decreasing on [lo, hi] (METHODS §3).

    The bracket fn(lo) ≥ target ≥ fn(hi) is checked first and kept throughout, so the result is a crossing of
    ``target`` even if fn is not monotone; with ``check_monotone`` a midpoint value outside the current
    bracket's values by more than ``tol`` raises instead, since the crossing found would then depend on the
    bracket.

    Arguments:
        fn: x > 0 → a float; deterministic (reuse one seeded generator inside for Hutchinson probes).
        target: The value to reach.
        lo, hi: The bracket, 0 < lo < hi.
        tol: Stop when |fn(x) − target| ≤ tol (same units as fn).
        max_iter: Midpoints evaluated at most (fn is called max_iter + 2 times at most).
        check_monotone: Raise on a midpoint outside the bracket's values (see above).
        name: What x is called in error messages.

    Returns:
        (x, fn(x)) with |fn(x) − target| ≤ tol.
    """
    if not 0 < lo < hi or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"need 0 < lo < hi (finite), got [{lo}, {hi}]")
    if tol < 0 or max_iter < 0:
        raise ValueError(f"need tol >= 0 and max_iter >= 0, got tol={tol}, max_iter={max_iter}")
    f_lo, f_hi = float(fn(lo)), float(fn(hi))
    for x, f in ((lo, f_lo), (hi, f_hi)):
        if abs(f - target) <= tol:
            return x, f
    ends = f"{f_lo:g} at {name}={lo:g}, {f_hi:g} at {name}={hi:g}"
    if not (math.isfinite(f_lo) and math.isfinite(f_hi)):
        raise ValueError(f"mean LID is not finite at an end ({ends}); narrow [lo, hi] to where the model is finite")
    if f_lo < target and f_hi < target:
        raise ValueError(f"target {target:g} is above the mean LID at both ends ({ends}); lower lo")
    if f_lo > target and f_hi > target:
        raise ValueError(f"target {target:g} is below the mean LID at both ends ({ends}); raise hi")
    if f_lo < f_hi:
        raise ValueError(f"mean LID increases ({ends}), expected a decrease; check the score's σ scale or narrow "
                         "[lo, hi]")
    a, b = math.log(lo), math.log(hi)
    for _ in range(max_iter):
        m = 0.5 * (a + b)
        x = math.exp(m)
        f = float(fn(x))
        if not math.isfinite(f):
            raise ValueError(f"mean LID is not finite ({f}) at {name}={x:g}; narrow [lo, hi] to where the model is "
                             "finite")
        if abs(f - target) <= tol:
            return x, f
        if check_monotone and not f_hi - tol <= f <= f_lo + tol:
            raise ValueError(f"mean LID is not decreasing in {name}: {f_lo:g}, {f:g}, {f_hi:g} at {name}="
                             f"{math.exp(a):g}, {x:g}, {math.exp(b):g}; narrow [lo, hi] or pass check_monotone=False")
        if f > target:
            a, f_lo = m, f
        else:
            b, f_hi = m, f
    raise ValueError(f"no {name} within tol={tol:g} of {target:g} after {max_iter} bisections (bracket "
                     f"{math.exp(a):g}–{math.exp(b):g}, mean LID {f_lo:g}–{f_hi:g}); raise max_iter or tol")


def first_crossing(
    fn: Callable[[float], float], target: float, lo: float, hi: float, points: int = 13
) -> tuple[float, float] | None:
    """The first bracket [a, b] with fn(a) > target ≥ fn(b) on a log-spaced grid of ``points`` values from ``lo`` up
    to ``hi``; (lo, lo) when fn(lo) ≤ target already; None when fn stays above the target on the whole grid.

    FLIPD's mean LID falls from D as σ₀ grows, but a trained network's curve need not keep falling to 0: on CIFAR-10
    (D = 3,072) it fell to ~120 at σ₀ ≈ 0.16 and rose again to ~1,000 at σ₀ ≥ 1, where the network is least accurate
    (docs/results.md). The ends of a wide bracket are then both above the target; the crossing that FLIPD means,
    the first one from small σ₀, is found by scanning up from ``lo``.

    Arguments:
        fn: x > 0 → a float, deterministic.
        target: The value to cross.
        lo, hi: The range scanned, 0 < lo < hi.
        points: Grid size (fn is called at most this often).
    """
    if not 0 < lo < hi or points < 2:
        raise ValueError(f"need 0 < lo < hi and points >= 2, got [{lo}, {hi}], points={points}")
    previous = None
    for x in np.geomspace(lo, hi, points):
        if float(fn(float(x))) <= target:
            return (float(x), float(x)) if previous is None else (previous, float(x))
        previous = float(x)
    return None


def calibrate_sigma0(
    lid_fn: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    tol: float = 0.1,
    max_iter: int = 40,
    check_monotone: bool = True,
) -> float:
    """FLIPD's σ₀ whose mean LID over the calibration points matches ``target`` (METHODS §3), by :func:`bisect_log`.

    FLIPD's mean LID falls from D (σ₀ below the data's off-manifold spread) through the plateau at the intrinsic
    dimension to 0 (σ₀ above the data's scale), so choose lo and hi on either side of the target, e.g. the
    pixel σ of VP times 1e-4 and 1 (:func:`dgmood.models.noise.t_to_sigma`: ≈ 1.6e-3 and ≈ 76); a target on a plateau
    is matched anywhere along it.

    Arguments:
        lid_fn: σ₀ (pixel scale) → mean FLIPD over the calibration points, e.g.
            ``lambda s: flipd(score_fn, x80, s, generator=torch.Generator().manual_seed(0)).mean().item()``
            (a fresh seeded generator per call, so the function is deterministic).
        target: The mean LID to match, e.g. :func:`target_lid`.
        lo, hi: The bracket of σ₀, 0 < lo < hi, with mean LID ≥ target at lo and ≤ target at hi.
        tol: Accepted |mean LID − target|, in dimensions.
        max_iter: Bisections at most (each one call of lid_fn); 40 halvings shrink a bracket of 10⁵ in σ₀ to
            ~1e-11 in log σ₀.
        check_monotone: Raise when a midpoint's mean LID leaves the bracket's values (a non-monotone curve).

    Returns:
        σ₀ on the pixel scale (:func:`dgmood.models.noise.sigma_to_t` converts to a VP time t₀).
    """
    return bisect_log(lid_fn, target, lo, hi, tol=tol, max_iter=max_iter, check_monotone=check_monotone,
                      name="sigma0")[0]


# --- the record ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A calibrated LID parameter, as stored with a run (METHODS §3).

    Attributes:
        target: The mean LPCA LID of the training set that was matched.
        parameter: What was calibrated, e.g. ``"tau"`` (flow / normal bundle) or ``"sigma0"`` (FLIPD).
        value: Its calibrated value (units of that parameter).
        achieved: The model's mean LID over the calibration points at ``value``.
        n_points: Number of calibration points.
    """

    target: float
    parameter: str
    value: float
    achieved: float
    n_points: int

    def __post_init__(self) -> None:
        types = {"target": float, "parameter": str, "value": float, "achieved": float, "n_points": int}
        for name, kind in types.items():
            object.__setattr__(self, name, kind(getattr(self, name)))  # numpy scalars → JSON types

    def to_dict(self) -> dict:
        """Plain floats, str and int: ``json.dumps`` ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        """Inverse of :meth:`to_dict`; unknown or missing keys raise."""
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"a Calibration needs exactly the keys {sorted(names)}, got {sorted(d)}")
        return cls(**d)
