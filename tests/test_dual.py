"""Tests for dgmood.detectors.dual: the optimal ROC against brute force, and the dual-threshold detector's contract."""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from dgmood.detectors.dual import (
    DualThresholdDetector,
    _sweep,
    optimal_roc_auc,
    optimal_roc_curve,
    optimal_true_positives,
)
from dgmood.evaluation.metrics import auroc


def _brute_true_positives(in_a, in_b, out_a, out_b):
    """T(k) from every pair of thresholds at the distinct values and +inf."""
    ta = np.r_[np.unique(np.r_[in_a, out_a]), np.inf][:, None, None]
    tb = np.r_[np.unique(np.r_[in_b, out_b]), np.inf][None, :, None]
    tp = ((in_a >= ta) & (in_b >= tb)).sum(-1).ravel()
    fp = ((out_a >= ta) & (out_b >= tb)).sum(-1).ravel()
    return np.array([tp[fp <= k].max() for k in range(len(out_a) + 1)])


def _random_pairs(seed):
    """Small random (in_a, in_b, out_a, out_b): continuous, integer-tied, or an anti-diagonal OOD line."""
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(1, 41, size=2)
    kind = seed % 3
    if kind == 0:
        return rng.normal(size=n_in), rng.normal(size=n_in), rng.normal(0.5, 1, n_out), rng.normal(-0.5, 1, n_out)
    if kind == 1:
        return tuple(rng.integers(0, 5, n).astype(float) for n in (n_in, n_in, n_out, n_out))
    t_in, t_out = rng.integers(0, 2 * n_out, n_in) + 0.5, np.arange(n_out) * 2.0
    return t_in, -t_in, t_out, -t_out


def _staircase_auroc(s_in, s_out):
    """Single-score AUROC under the upper staircase (ties never flatter)."""
    return optimal_roc_auc(s_in, np.zeros_like(s_in), s_out, np.zeros_like(s_out))


@pytest.mark.parametrize("seed", range(300))
def test_true_positives_match_brute_force(seed):
    x = _random_pairs(seed)
    expected = _brute_true_positives(*x)
    np.testing.assert_array_equal(optimal_true_positives(*x), expected)
    np.testing.assert_array_equal(_sweep(*x), expected)
    np.testing.assert_array_equal(_sweep(x[1], x[0], x[3], x[2]), expected)


@pytest.mark.parametrize("seed", range(0, 300, 7))
def test_curve_is_the_staircase_of_the_frontier(seed):
    x = _random_pairs(seed)
    tp, (fpr, tpr) = _brute_true_positives(*x), optimal_roc_curve(*x)
    n_in, n_out = len(x[0]), len(x[2])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all((np.diff(fpr) == 0) | (np.diff(tpr) == 0))
    grid = (np.arange(n_out) + 0.5) / n_out
    np.testing.assert_allclose(np.interp(grid, fpr, tpr), tp[:-1] / n_in)
    assert np.trapezoid(tpr, fpr) == pytest.approx(optimal_roc_auc(*x), abs=1e-12)
    assert optimal_roc_auc(*x) == pytest.approx(tp[:-1].sum() / (n_in * n_out), abs=1e-15)


def test_hand_built_curve():
    in_a, in_b = np.array([3.0, 1.0]), np.array([1.0, 3.0])
    out_a, out_b = np.array([2.0, 0.0]), np.array([0.0, 2.0])
    np.testing.assert_array_equal(optimal_true_positives(in_a, in_b, out_a, out_b), [2, 2, 2])
    fpr, tpr = optimal_roc_curve(in_a, in_b, out_a, out_b)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_constant_second_score_reduces_to_auroc(seed):
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    ones_in, ones_out = np.ones_like(s_in), np.ones_like(s_out)
    assert optimal_roc_auc(s_in, ones_in, s_out, ones_out) == pytest.approx(auroc(s_in, s_out), abs=1e-12)
    assert optimal_roc_auc(ones_in, s_in, ones_out, s_out) == pytest.approx(auroc(s_in, s_out), abs=1e-12)
    tied_in, tied_out = np.round(s_in), np.round(s_out)
    assert optimal_roc_auc(tied_in, ones_in, tied_out, ones_out) < auroc(tied_in, tied_out)


def test_perfect_separation():
    rng = np.random.default_rng(0)
    in_b, out_b = rng.normal(size=50), rng.normal(size=40)
    assert optimal_roc_auc(rng.uniform(2, 3, 50), in_b, rng.uniform(0, 1, 40), out_b) == 1.0
    # Neither score alone separates; the quadrant a >= 1, b >= 1 does.
    in_a, in_b = rng.uniform(1, 2, 30), rng.uniform(1, 2, 30)
    low, high = rng.uniform(0, 0.9, 20), rng.uniform(2, 3, 20)
    out_a, out_b = np.r_[low, high], np.r_[high, low]
    assert auroc(in_a, out_a) < 1 and auroc(in_b, out_b) < 1
    assert optimal_roc_auc(in_a, in_b, out_a, out_b) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_invariant_under_monotone_transforms(seed):
    x = _random_pairs(seed)
    f, g = (lambda s: s**3 + s), (lambda s: np.exp(s / 10))
    y = f(x[0]), g(x[1]), f(x[2]), g(x[3])
    for before, after in zip(optimal_roc_curve(*x), optimal_roc_curve(*y)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("seed", range(10))
def test_at_least_each_single_score(seed):
    rng = np.random.default_rng(seed)
    cov = [[1, rng.uniform(-0.9, 0.9)], [0, 1]]
    x_in, x_out = rng.normal(size=(300, 2)) @ cov, rng.normal(rng.normal(size=2), 1, (200, 2)) @ cov
    area = optimal_roc_auc(x_in[:, 0], x_in[:, 1], x_out[:, 0], x_out[:, 1])
    assert area >= max(auroc(x_in[:, 0], x_out[:, 0]), auroc(x_in[:, 1], x_out[:, 1]))


@pytest.mark.parametrize("bad", [
    dict(in_a=[np.nan, 1.0]), dict(out_b=[np.inf, 0.0]), dict(in_b=[1.0]), dict(out_a=[[1.0, 2.0]]),
    dict(in_a=[], in_b=[]),
])
def test_invalid_scores_raise(bad):
    x = dict(in_a=[1.0, 2.0], in_b=[1.0, 2.0], out_a=[0.0, 1.0], out_b=[0.0, 1.0]) | bad
    with pytest.raises(ValueError):
        optimal_roc_auc(**x)


@parametrize_with_checks([DualThresholdDetector(), DualThresholdDetector(acceptance=0.5)])
def test_sklearn_contract(estimator, check):
    check(estimator)


def _paradox_data(n, seed=0):
    """In-distribution N(0, I); OOD with higher likelihood (column 0) but much lower LID (column 1)."""
    rng = np.random.default_rng(seed)
    train, test = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    ood = np.column_stack([rng.normal(1.5, 0.5, n), rng.normal(-3.0, 1.0, n)])
    return train, test, ood


def _all_above(detector, X):
    return np.where(np.all(X >= detector.thresholds_, axis=1), 1, -1)


@pytest.mark.parametrize("integer_lid", [False, True])
def test_predict_is_the_all_above_rule(integer_lid):
    train, test, ood = _paradox_data(500)
    if integer_lid:
        train, test, ood = (np.column_stack([X[:, 0], np.round(3 * X[:, 1])]) for X in (train, test, ood))
    detector = DualThresholdDetector(acceptance=0.9).fit(train)
    edges = np.array([detector.thresholds_, np.nextafter(detector.thresholds_, -np.inf),
                      [detector.thresholds_[0], -1e9], [1e9, np.nextafter(detector.thresholds_[1], -np.inf)]])
    for X in (train, test, ood, edges):
        pred = detector.predict(X)
        np.testing.assert_array_equal(pred, _all_above(detector, X))
        np.testing.assert_array_equal(pred == 1, detector.decision_function(X) >= 0)
    np.testing.assert_array_equal(detector.predict(edges), [1, -1, -1, -1])
    if not integer_lid:  # continuous columns: both thresholds sit at the same training quantile
        t0, t1 = detector.thresholds_
        np.testing.assert_array_equal(detector.score_samples([[t0, 1e9], [1e9, t1]]), detector.offset_)


@pytest.mark.parametrize("acceptance", [0.5, 0.8, 0.95, 1.0])
def test_training_acceptance(acceptance):
    train, test, _ = _paradox_data(1000)
    detector = DualThresholdDetector(acceptance=acceptance).fit(train)
    rate = np.mean(detector.predict(train) == 1)
    assert acceptance <= rate <= acceptance + 1e-3
    assert np.mean(detector.predict(test) == 1) == pytest.approx(acceptance, abs=0.04)
    for column, knots, levels, threshold in zip(train.T, detector.knots_, detector.levels_, detector.thresholds_):
        assert np.mean(column >= threshold) >= acceptance
        np.testing.assert_array_equal(levels, [np.mean(column <= u) for u in knots])


def test_training_acceptance_with_ties_is_at_least_the_target():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(size=400), rng.integers(240, 250, 400)])
    detector = DualThresholdDetector(acceptance=0.95).fit(train)
    assert np.mean(detector.predict(train) == 1) >= 0.95


def test_score_is_min_of_training_cdfs():
    train = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0]])
    detector = DualThresholdDetector(acceptance=0.75).fit(train)
    X = np.array([[0.0, 40.0], [1.5, 40.0], [3.0, 25.0], [-1.0, 50.0], [9.0, 99.0]])
    np.testing.assert_allclose(detector.score_samples(X), [0.25, 0.625, 0.625, 0.0, 1.0])
    assert detector.offset_ == 0.5
    np.testing.assert_array_equal(detector.thresholds_, [1.0, 20.0])


def test_threshold_inside_a_segment_is_the_exact_boundary():
    train = np.array([[0.0, -1.0], [1.0, -1.0], [2.0, 1.0], [3.0, 1.0]])
    detector = DualThresholdDetector(acceptance=0.5).fit(train)
    t = detector.thresholds_[1]
    assert detector.offset_ == 0.75 and detector.thresholds_[0] == 2.0 and -1e-15 < t <= 0.0
    scores = detector.score_samples([[9.0, t], [9.0, np.nextafter(t, -np.inf)]])
    assert scores[0] >= 0.75 > scores[1]


def test_dual_beats_likelihood_on_the_paradox():
    train, test, ood = _paradox_data(2000)
    scores = DualThresholdDetector().fit(train).score_samples
    dual, likelihood = auroc(scores(test), scores(ood)), auroc(test[:, 0], ood[:, 0])
    assert likelihood < 0.2 and dual > 0.95
    # Every level of score_samples is a threshold pair, so its staircase AUROC is at most the optimal one.
    assert _staircase_auroc(scores(test), scores(ood)) <= optimal_roc_auc(test[:, 0], test[:, 1], ood[:, 0], ood[:, 1])


def test_invalid_inputs_raise():
    train, _, _ = _paradox_data(50)
    detector = DualThresholdDetector().fit(train)
    for X in (np.array([[np.nan, 1.0], [0.0, 1.0]]), np.ones(10), np.ones((3, 2, 2))):
        with pytest.raises(ValueError):
            DualThresholdDetector().fit(X)
    for X in (np.array([[np.nan, 1.0]]), np.ones(2), np.ones((4, 3))):
        with pytest.raises(ValueError):
            detector.predict(X)
    for params in (dict(combine="product"), dict(acceptance=0.0), dict(acceptance=1.5)):
        with pytest.raises(ValueError):
            DualThresholdDetector(**params).fit(train)
