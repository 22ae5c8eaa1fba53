"""Dual threshold on likelihood and LID: the exact optimal ROC and a fitted detector; higher = more in-distribution."""

from __future__ import annotations

import math
import numbers

import numpy as np
from sklearn.utils.validation import check_scalar, validate_data

from dgmood.detectors.estimators import BaseDetector

__all__ = ["DualThresholdDetector", "optimal_roc_auc", "optimal_roc_curve", "optimal_true_positives"]

_COMBINE = ("rank",)


def _check_pairs(in_a, in_b, out_a, out_b) -> tuple[np.ndarray, ...]:
    """Return the four score arrays as float64 after checking shapes (1-D, non-empty, paired) and finiteness."""
    names = ("in_a", "in_b", "out_a", "out_b")
    arrays = [np.asarray(s, dtype=np.float64) for s in (in_a, in_b, out_a, out_b)]
    for name, a in zip(names, arrays):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name} must be 1-D and non-empty, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite (found NaN or inf)")
    if arrays[0].size != arrays[1].size or arrays[2].size != arrays[3].size:
        raise ValueError("in_a / in_b and out_a / out_b must have equal lengths, got "
                         f"{arrays[0].size} / {arrays[1].size} and {arrays[2].size} / {arrays[3].size}")
    return tuple(arrays)


def _blocks(a: np.ndarray, is_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order by decreasing ``a`` and, per sorted point, the index of its block of tied ``a`` values."""
    order = np.argsort(-a, kind="stable")
    a_sorted = a[order]
    block = np.cumsum(np.r_[True, a_sorted[1:] != a_sorted[:-1]]) - 1
    return order, block


def _candidate_ends(block: np.ndarray, in_sorted: np.ndarray) -> np.ndarray:
    """End positions (in sorted order) of the candidate sets {a >= psi_a} worth evaluating.

    A set is worth evaluating when its lowest block holds an in-distribution point and the next block
    holds an OOD point (or there is none): otherwise lowering or raising psi_a to the neighbouring
    block gains in-distribution points without gaining OOD ones, or loses OOD points only.
    """
    n_blocks = block[-1] + 1
    has_in = np.bincount(block[in_sorted], minlength=n_blocks) > 0
    has_out = np.bincount(block[~in_sorted], minlength=n_blocks) > 0
    candidates = np.flatnonzero(has_in & np.r_[has_out[1:], True])
    return np.searchsorted(block, candidates, side="right")


def _add_in(h: np.ndarray, ood: np.ndarray, inl: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add in-distribution points with second scores ``v``: h[k] += #{v > (k+1)-th largest OOD score}."""
    v = np.sort(v)
    if h.size:
        rank = ood.size - np.searchsorted(ood, v, side="left")
        h = h + np.cumsum(np.bincount(rank, minlength=h.size + 1)[:h.size])
    return h, np.insert(inl, np.searchsorted(inl, v), v)


def _add_out(h: np.ndarray, ood: np.ndarray, inl: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add OOD points with second scores ``w``: insert #{in-distribution > w} at each one's descending rank."""
    w = np.sort(w)
    accepted_in = inl.size - np.searchsorted(inl, w, side="right")
    rank = ood.size - np.searchsorted(ood, w, side="right")
    return np.insert(h, rank[::-1], accepted_in[::-1]), np.insert(ood, np.searchsorted(ood, w), w)


def _sweep(in_a, in_b, out_a, out_b) -> np.ndarray:
    """Best in-distribution count for each OOD budget k = 0..n_out, sweeping psi_a downwards."""
    is_in = np.r_[np.ones(in_a.size, bool), np.zeros(out_a.size, bool)]
    order, block = _blocks(np.r_[in_a, out_a], is_in)
    b_sorted, in_sorted = np.r_[in_b, out_b][order], is_in[order]
    best = np.zeros(out_a.size + 1, np.int64)
    tail = np.zeros(out_a.size + 1, np.int64)
    h, ood, inl = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    start = 0
    for end in _candidate_ends(block, in_sorted):
        b, inside = b_sorted[start:end], in_sorted[start:end]
        h, inl = _add_in(h, ood, inl, b[inside])
        h, ood = _add_out(h, ood, inl, b[~inside])
        np.maximum(best[:h.size], h, out=best[:h.size])
        tail[h.size] = max(tail[h.size], inl.size)
        start = end
    tail[-1] = in_a.size
    return np.maximum.accumulate(np.maximum(best, np.maximum.accumulate(tail)))


def _n_candidates(in_a: np.ndarray, out_a: np.ndarray) -> int:
    """Number of candidate sets the sweep over ``a`` evaluates."""
    is_in = np.r_[np.ones(in_a.size, bool), np.zeros(out_a.size, bool)]
    order, block = _blocks(np.r_[in_a, out_a], is_in)
    return _candidate_ends(block, is_in[order]).size


def optimal_true_positives(in_a, in_b, out_a, out_b) -> np.ndarray:
    r"""Most in-distribution points any threshold pair accepts while accepting at most k OOD points.

    A pair :math:`(\psi_a, \psi_b)` accepts a point iff :math:`a \ge \psi_a` and :math:`b \ge \psi_b`.
    The result is :math:`T(k) = \max \{TP(\psi_a, \psi_b) : FP(\psi_a, \psi_b) \le k\}`, the Pareto
    frontier of all threshold pairs as counts. Thresholds range over the distinct values (and
    :math:`\pm\infty`), so tied points are always accepted together.

    Algorithm: for a fixed set :math:`S = \{a \ge \psi_a\}` the best :math:`\psi_b` for budget k lies
    just above the (k+1)-th largest OOD ``b`` in S, so :math:`T_S(k)` = #in-distribution points of S
    above it. Sweeping :math:`\psi_a` downwards, :math:`T_S` is updated incrementally (an added
    in-distribution point adds 1 on a suffix, an added OOD point inserts one entry) and maxed into T.
    Only the C sets whose boundary separates in-distribution from OOD points are evaluated, and the
    sweep runs over the score with fewer such sets. Time :math:`O(C\,(n_{in} + n_{out}) + n \log n)`
    with :math:`C \le \min(n_{in}, n_{out}) + 1`, memory O(n), all inner work vectorised.
    Measured (one core): 0.5 s for 10^4 + 10^4 and 14 s for 10^5 + 10^5 points of two identical
    distributions (C = 5e4, the worst case for random data); 2 s on a likelihood-paradox shift.

    No exact :math:`O(n \log n)` algorithm is known: with the OOD points on an anti-diagonal, T(k)
    is the most ones in a window with k zeros of a binary string, i.e. binary jumbled indexing,
    whose best known algorithms take about :math:`n^{1.5}`.

    Args:
        in_a: shape (n_in,), first score of in-distribution points, higher = more in-distribution.
        in_b: shape (n_in,), second score of the same points.
        out_a: shape (n_out,), first score of OOD points.
        out_b: shape (n_out,), second score of OOD points.

    Returns:
        int64 array T of shape (n_out + 1,), non-decreasing, T[0] >= 0, T[n_out] = n_in.
    """
    in_a, in_b, out_a, out_b = _check_pairs(in_a, in_b, out_a, out_b)
    if _n_candidates(in_b, out_b) < _n_candidates(in_a, out_a):
        in_a, in_b, out_a, out_b = in_b, in_a, out_b, out_a
    return _sweep(in_a, in_b, out_a, out_b)


def optimal_roc_curve(in_a, in_b, out_a, out_b) -> tuple[np.ndarray, np.ndarray]:
    r"""Optimal ROC of the dual threshold (Liu & Zhu 2022), in-distribution positive, as a staircase.

    The curve is :math:`TPR(f) = \max \{TPR(\psi_a, \psi_b) : FPR(\psi_a, \psi_b) \le f\}`: the best
    TPR of any threshold pair at FPR at most f, i.e. the upper-left staircase through the Pareto
    frontier plus (0, 0) and (1, 1). Between frontier points TPR stays at the lower point's value
    until the next frontier FPR, then jumps vertically. See :func:`optimal_true_positives`.

    Args:
        in_a: shape (n_in,), first score of in-distribution points, higher = more in-distribution.
        in_b: shape (n_in,), second score of the same points.
        out_a: shape (n_out,), first score of OOD points.
        out_b: shape (n_out,), second score of OOD points.

    Returns:
        (fpr, tpr), each of shape (n_vertices,), non-decreasing, from (0, 0) to (1, 1): the corners of
        the staircase, so that linear interpolation between them draws it exactly and the trapezoidal
        area equals :func:`optimal_roc_auc`.
    """
    tp = optimal_true_positives(in_a, in_b, out_a, out_b)
    k = np.flatnonzero(np.diff(tp, prepend=-1))
    fpr, tpr = k / (tp.size - 1), tp[k] / tp[-1]
    xs = np.r_[0.0, np.repeat(fpr, 2), 1.0]
    ys = np.r_[0.0, np.column_stack([np.r_[0.0, tpr[:-1]], tpr]).ravel(), 1.0]
    keep = np.r_[True, (np.diff(xs) != 0) | (np.diff(ys) != 0)]
    return xs[keep], ys[keep]


def optimal_roc_auc(in_a, in_b, out_a, out_b) -> float:
    r"""Area under :func:`optimal_roc_curve`: :math:`\sum_{k=0}^{n_{out}-1} T(k) / (n_{in} n_{out})`.

    Args:
        in_a: shape (n_in,), first score of in-distribution points, higher = more in-distribution.
        in_b: shape (n_in,), second score of the same points.
        out_a: shape (n_out,), first score of OOD points.
        out_b: shape (n_out,), second score of OOD points.

    Returns:
        The area in [0, 1]; at least the (staircase) AUROC of either score alone.
    """
    tp = optimal_true_positives(in_a, in_b, out_a, out_b)
    return int(tp[:-1].sum()) / (int(tp[-1]) * (tp.size - 1))


def _ecdf_knots(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sorted values u of a training column and the fractions p of values <= each (p[-1] = 1)."""
    knots = np.unique(column)
    return knots, np.searchsorted(np.sort(column), knots, side="right") / column.size


def _cdf(x: np.ndarray, knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Interpolated training CDF: 0 below the knots, ``levels`` at them, linear between, 1 from the top knot.

    Strictly below a knot the value stays strictly below that knot's level, so F(x) >= levels[i] iff
    x >= knots[i] holds exactly in floating point; F is non-decreasing.
    """
    i = np.searchsorted(knots, x, side="right") - 1
    out = (i == knots.size - 1).astype(np.float64)
    inside = (i >= 0) & (i < knots.size - 1)
    j = i[inside]
    frac = (x[inside] - knots[j]) / (knots[j + 1] - knots[j])
    upper = np.nextafter(levels[j + 1], -np.inf)
    out[inside] = np.minimum(levels[j] + frac * (levels[j + 1] - levels[j]), upper)
    return out


def _ordered(x: float) -> int:
    """Integer key of a float64 that orders like the float (adjacent floats have adjacent keys)."""
    bits = int(np.float64(x).view(np.int64))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFFFFFFFFFF)


def _unordered(key: int) -> float:
    """Inverse of :func:`_ordered`."""
    return float(np.int64(abs(key)).view(np.float64)) * (1.0 if key >= 0 else -1.0)


def _cdf_threshold(knots: np.ndarray, levels: np.ndarray, q: float) -> float:
    """Smallest float t with F(t) >= q for the interpolated CDF F and a level q in (0, 1].

    Bisection over the float64 values between the two knots around q (at most 64 steps), so that
    x >= t iff F(x) >= q holds exactly.
    """
    k = int(np.searchsorted(levels, q, side="left"))
    if k == 0:
        return float(knots[0])
    lo, hi = _ordered(knots[k - 1]), _ordered(knots[k])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _cdf(np.array([_unordered(mid)]), knots, levels)[0] >= q:
            hi = mid
        else:
            lo = mid
    return _unordered(hi)


def _acceptance_level(scores: np.ndarray, acceptance: float) -> float:
    """Largest level q with at least ``acceptance`` of ``scores`` >= q (the ceil(acceptance n)-th largest)."""
    k = min(scores.size, max(1, math.ceil(round(acceptance * scores.size, 9))))
    return float(np.sort(scores)[scores.size - k])


class DualThresholdDetector(BaseDetector):
    r"""Accept a point only when every statistic is above its threshold (likelihood and LID, Kamkari et al.).

    Fitted on in-distribution features X of shape (n_samples, n_statistics), each column a statistic
    with higher = more in-distribution; the paper's case is two columns, log-likelihood and LID.
    Any number of columns >= 1 works the same way (one column: a plain quantile threshold).

    ``score_samples(X)`` is :math:`\min_j F_j(x_j)`, shape (n_samples,), higher = more
    in-distribution, where :math:`F_j` is the empirical CDF of training column j (fraction of training
    values <= x at each distinct training value, linear in between, 0 below the smallest, 1 from the
    largest): how far inside all thresholds a point is, in training-quantile units. Because the
    minimum is above a level q iff every :math:`F_j(x_j)` is, thresholding it at q is the
    "all columns above" rule with equal per-column quantile q.

    ``fit`` picks q by a 1-D search over the training scores: ``offset_`` is the largest q whose joint
    acceptance on the training data (every column at or above its threshold) is >= ``acceptance``,
    i.e. the ceil(acceptance n)-th largest training score. Ties in a column (e.g. an integer LID) can
    make the training acceptance exceed the target. ``thresholds_[j]`` is the smallest value t with
    :math:`F_j(t) \ge` ``offset_``, so ``predict(X) == +1`` iff ``X[:, j] >= thresholds_[j]`` for
    every j, exactly, and iff ``decision_function(X) >= 0``.

    Args:
        acceptance: target fraction of in-distribution training data accepted, in (0, 1].
        combine: how the columns are combined into ``score_samples``; only "rank" (the minimum of the
            per-column training CDFs, the one ranking consistent with equal-quantile thresholds).

    Attributes:
        knots_: list of n_features_in_ arrays, the distinct sorted training values of each column.
        levels_: list of arrays of the same shapes, the training CDF at each knot.
        offset_: the common quantile level q; threshold on ``score_samples``.
        thresholds_: array of shape (n_features_in_,), the per-column thresholds.
    """

    def __init__(self, acceptance=0.95, combine="rank"):
        self.acceptance = acceptance
        self.combine = combine

    def fit(self, X, y=None):
        """Fit the per-column training CDFs, the common level ``offset_`` and the thresholds.

        Args:
            X: array of shape (n_samples, n_statistics), n_samples >= 2, finite values only.
            y: ignored, present for API consistency.

        Returns:
            self.
        """
        check_scalar(self.acceptance, "acceptance", numbers.Real, min_val=0.0, max_val=1.0,
                     include_boundaries="right")
        if self.combine not in _COMBINE:
            raise ValueError(f"combine must be one of {_COMBINE}, got {self.combine!r}")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        self.knots_, self.levels_ = map(list, zip(*(_ecdf_knots(column) for column in X.T)))
        self.offset_ = _acceptance_level(self._score_samples(X), self.acceptance)
        self.thresholds_ = np.array([_cdf_threshold(u, p, self.offset_) for u, p in zip(self.knots_, self.levels_)])
        return self

    def _score_samples(self, X):
        return np.min([_cdf(x, u, p) for x, u, p in zip(X.T, self.knots_, self.levels_)], axis=0)
