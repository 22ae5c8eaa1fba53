"""One statistic as the score: the raw-pixel k-NN baseline, or any single column, thresholded on training data."""

from __future__ import annotations

import numbers

from sklearn.utils.validation import check_scalar

from dgmood.detectors.estimators import BaseDetector

__all__ = ["ThresholdDetector"]


class ThresholdDetector(BaseDetector):
    """``score_samples(X) = sign · X[:, column]``, shape (n_samples,), higher = more in-distribution.

    For a distance (e.g. the log distance to the 5th nearest training image) ``sign = -1``. ``offset_`` is the
    ``1 - acceptance`` quantile of the training scores, as for every dgmood detector.

    Args:
        column: Which column of X is the statistic.
        sign: +1 when larger values are more in-distribution, -1 when smaller are.
        acceptance: Target fraction of in-distribution data predicted +1, in (0, 1].
    """

    def __init__(self, column=0, sign=-1.0, acceptance=0.95):
        self.column = column
        self.sign = sign
        self.acceptance = acceptance

    def _fit(self, X):
        check_scalar(self.column, "column", numbers.Integral, min_val=0, max_val=X.shape[1] - 1)
        if self.sign not in (-1, 1):
            raise ValueError(f"sign must be +1 or -1, got {self.sign!r}")
        self.scaler_ = None
        return self._score_samples(X)

    def _score_samples(self, X):
        return float(self.sign) * X[:, self.column]
