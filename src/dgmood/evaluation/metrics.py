"""OOD detection metrics (AUROC, AUPR-in/out, FPR@TPR, detection error); scores are higher = more in-distribution."""

from __future__ import annotations

import numpy as np

__all__ = ["METRIC_NAMES", "auroc", "aupr_in", "aupr_out", "detection_error", "evaluate", "fpr_at_tpr", "roc_curve"]

METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "fpr_at_80_tpr", "detection_error")


def _check(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    """Return both score arrays as float64 after checking they are 1-D, non-empty and finite."""
    arrays = []
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        a = np.asarray(s, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{name} must be non-empty")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite (found NaN or inf)")
        arrays.append(a)
    return arrays[0], arrays[1]


def _counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``pos`` and ``neg`` scores ``>= t`` for t = +inf, then every distinct score, descending.

    Tied scores share one threshold, so a tie is never split. Both outputs have shape (n_distinct + 1,),
    start at 0 and end at ``len(pos)`` / ``len(neg)``.
    """
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tp = pos.size - np.searchsorted(np.sort(pos), thresholds, side="left")
    fp = neg.size - np.searchsorted(np.sort(neg), thresholds, side="left")
    return np.concatenate([[0], tp]), np.concatenate([[0], fp])


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision sum_k (R_k - R_{k-1}) P_k with ``pos`` the positive class (as sklearn)."""
    tp, fp = _counts(pos, neg)
    precision = tp[1:] / (tp[1:] + fp[1:])
    return min(1.0, float(np.sum(np.diff(tp) / pos.size * precision)))


def roc_curve(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with in-distribution as the positive class.

    Args:
        scores_in: shape (n_in,), in-distribution scores, higher = more in-distribution.
        scores_out: shape (n_out,), OOD scores, same sign convention.

    Returns:
        (fpr, tpr), each shape (n_distinct + 1,), non-decreasing, from (0, 0) to (1, 1). Each distinct
        score value is one threshold, so tied scores form a single (possibly diagonal) step.
    """
    s_in, s_out = _check(scores_in, scores_out)
    tp, fp = _counts(s_in, s_out)
    return fp / s_out.size, tp / s_in.size


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve, in-distribution positive; ties count half (= P(in > out) + 0.5 P(in = out)).

    Args:
        scores_in: shape (n_in,), higher = more in-distribution.
        scores_out: shape (n_out,).
    """
    fpr, tpr = roc_curve(scores_in, scores_out)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def aupr_in(scores_in, scores_out) -> float:
    """Average precision with in-distribution positive (matches sklearn ``average_precision_score``).

    Args:
        scores_in: shape (n_in,), higher = more in-distribution.
        scores_out: shape (n_out,).
    """
    s_in, s_out = _check(scores_in, scores_out)
    return _average_precision(s_in, s_out)


def aupr_out(scores_in, scores_out) -> float:
    """Average precision with OOD positive, ranking by the negated scores (higher -score = more OOD).

    Args:
        scores_in: shape (n_in,), higher = more in-distribution.
        scores_out: shape (n_out,).
    """
    s_in, s_out = _check(scores_in, scores_out)
    return _average_precision(-s_out, -s_in)


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """FPR at the largest threshold t that accepts (score >= t) at least ``tpr`` of in-distribution scores.

    OOD scores tied with t count as accepted, i.e. against the detector.

    Args:
        scores_in: shape (n_in,), higher = more in-distribution.
        scores_out: shape (n_out,).
        tpr: target true-positive rate in [0, 1].

    Returns:
        Fraction of ``scores_out`` that are >= t.
    """
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"tpr must be in [0, 1], got {tpr}")
    fpr_curve, tpr_curve = roc_curve(scores_in, scores_out)
    return float(fpr_curve[np.argmax(tpr_curve >= tpr)])


def detection_error(scores_in, scores_out) -> float:
    """Min over thresholds of 0.5 (1 - TPR) + 0.5 FPR (equal class priors), in-distribution positive.

    Thresholds are every distinct score plus +-inf; tied scores are never split between the classes.

    Args:
        scores_in: shape (n_in,), higher = more in-distribution.
        scores_out: shape (n_out,).
    """
    fpr, tpr = roc_curve(scores_in, scores_out)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def evaluate(scores_in, scores_out) -> dict[str, float]:
    """All metrics in ``METRIC_NAMES`` order, as plain Python floats.

    Args:
        scores_in: shape (n_in,), higher = more in-distribution.
        scores_out: shape (n_out,).
    """
    s_in, s_out = _check(scores_in, scores_out)
    values = (
        auroc(s_in, s_out),
        aupr_in(s_in, s_out),
        aupr_out(s_in, s_out),
        fpr_at_tpr(s_in, s_out, 0.95),
        fpr_at_tpr(s_in, s_out, 0.80),
        detection_error(s_in, s_out),
    )
    return {name: float(v) for name, v in zip(METRIC_NAMES, values)}
