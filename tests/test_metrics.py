"""Tests for dgmood.evaluation.metrics: edge cases, hand-computed ties, and agreement with scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from dgmood.evaluation.metrics import (
    METRIC_NAMES,
    aupr_in,
    aupr_out,
    auroc,
    detection_error,
    evaluate,
    fpr_at_tpr,
    roc_curve,
)

# Hand-built partially tied case: an in/out tie at 2 and at 1.
TIED_IN = np.array([3.0, 2.0, 2.0, 1.0])
TIED_OUT = np.array([2.0, 1.0, 0.0])


def _sklearn_inputs(s_in, s_out):
    y = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    return y, np.concatenate([s_in, s_out])


def _random_scores(seed, ties, n_in=300, n_out=200):
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(1.0, 1.0, n_in), rng.normal(0.0, 1.5, n_out)
    if ties:  # coarse rounding produces many ties, including between the classes
        s_in, s_out = np.round(s_in * 2) / 2, np.round(s_out * 2) / 2
    return s_in, s_out


def test_perfect_separation():
    m = evaluate([5.0, 6.0, 7.0], [1.0, 2.0])
    assert m == {
        "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0,
        "fpr_at_95_tpr": 0.0, "fpr_at_80_tpr": 0.0, "detection_error": 0.0,
    }


def test_inverted_scores():
    m = evaluate([0.0, 1.0], [2.0, 3.0])
    assert m["auroc"] == 0.0
    assert m["fpr_at_95_tpr"] == 1.0 and m["fpr_at_80_tpr"] == 1.0
    assert m["detection_error"] == 0.5  # the trivial threshold (+-inf) is always available


def test_all_tied_scores_never_flatter():
    s_in, s_out = np.zeros(5), np.zeros(7)
    assert auroc(s_in, s_out) == 0.5
    assert fpr_at_tpr(s_in, s_out, 0.95) == 1.0
    assert detection_error(s_in, s_out) == 0.5
    assert aupr_in(s_in, s_out) == pytest.approx(5 / 12)  # = prevalence of the positive class
    assert aupr_out(s_in, s_out) == pytest.approx(7 / 12)
    fpr, tpr = roc_curve(s_in, s_out)
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0])


def test_partial_ties_roc_curve_by_hand():
    fpr, tpr = roc_curve(TIED_IN, TIED_OUT)
    # thresholds +inf, 3, 2, 1, 0
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 4, 3 / 4, 1, 1])


def test_partial_ties_metrics_by_hand():
    # pairs (in, out): 3 beats all 3; each 2 gives 0.5 + 1 + 1; 1 gives 0 + 0.5 + 1 -> 9.5 / 12
    assert auroc(TIED_IN, TIED_OUT) == pytest.approx(19 / 24)
    # AP-in: recall steps 1/4, 1/2, 1/4 at precisions 1, 3/4, 4/6
    assert aupr_in(TIED_IN, TIED_OUT) == pytest.approx(1 / 4 + 1 / 2 * 3 / 4 + 1 / 4 * 4 / 6)
    # AP-out on negated scores: recall steps of 1/3 at precisions 1, 2/3, 1/2
    assert aupr_out(TIED_IN, TIED_OUT) == pytest.approx(13 / 18)
    # tpr 0.95 / 0.8 need all 4 in-scores -> t = 1 -> out {2, 1} accepted
    assert fpr_at_tpr(TIED_IN, TIED_OUT, 0.95) == pytest.approx(2 / 3)
    assert fpr_at_tpr(TIED_IN, TIED_OUT, 0.80) == pytest.approx(2 / 3)
    # tpr 0.5 / 0.75 -> t = 2, and the OOD 2 tied with it counts as accepted
    assert fpr_at_tpr(TIED_IN, TIED_OUT, 0.5) == pytest.approx(1 / 3)
    assert fpr_at_tpr(TIED_IN, TIED_OUT, 0.75) == pytest.approx(1 / 3)
    assert fpr_at_tpr(TIED_IN, TIED_OUT, 0.25) == 0.0
    # best threshold t = 2: 0.5 * (1 - 3/4) + 0.5 * 1/3
    assert detection_error(TIED_IN, TIED_OUT) == pytest.approx(7 / 24)


def test_fpr_at_tpr_exact_boundary():
    # 19/20 in-scores >= 1 is exactly 95%, so t = 1 (not 0) and the OOD score 0.5 is rejected.
    assert fpr_at_tpr(np.arange(20.0), [0.5], 0.95) == 0.0
    assert fpr_at_tpr(np.arange(20.0), [0.5], 0.951) == 1.0


def test_tie_cannot_be_split_for_detection_error():
    # Splitting the tie at 1 would give error 0; grouped, the best is 0.25 (threshold above or at 1).
    assert detection_error([1.0, 2.0], [1.0, 0.0]) == pytest.approx(0.25)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_agrees_with_sklearn(seed, ties):
    s_in, s_out = _random_scores(seed, ties)
    y, s = _sklearn_inputs(s_in, s_out)
    assert auroc(s_in, s_out) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert aupr_in(s_in, s_out) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert aupr_out(s_in, s_out) == pytest.approx(skm.average_precision_score(1 - y, -s), abs=1e-12)

    sk_fpr, sk_tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    fpr, tpr = roc_curve(s_in, s_out)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    for target in (0.8, 0.95):
        assert fpr_at_tpr(s_in, s_out, target) == pytest.approx(sk_fpr[np.argmax(sk_tpr >= target)])
    assert detection_error(s_in, s_out) == pytest.approx(np.min(0.5 * (1 - sk_tpr) + 0.5 * sk_fpr))


@pytest.mark.parametrize("seed", [0, 1])
def test_fpr_at_tpr_matches_threshold_definition(seed):
    s_in, s_out = _random_scores(seed, ties=True)
    # brute force: the largest t with mean(s_in >= t) >= 0.95 is an in-distribution score value
    t = max(v for v in np.unique(s_in) if np.mean(s_in >= v) >= 0.95)
    assert fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(np.mean(s_out >= t))


def test_large_input_agrees_with_sklearn():
    rng = np.random.default_rng(7)
    s_in, s_out = np.round(rng.normal(0.5, 1.0, 100_000), 2), np.round(rng.normal(0.0, 1.0, 100_000), 2)
    y, s = _sklearn_inputs(s_in, s_out)
    assert auroc(s_in, s_out) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-10)
    assert aupr_in(s_in, s_out) == pytest.approx(skm.average_precision_score(y, s), abs=1e-10)


def test_sign_convention_shifting_ood_down_raises_auroc():
    s_in, s_out = _random_scores(0, ties=False)
    before = auroc(s_in, s_out)
    assert auroc(s_in, s_out - 1.0) > before
    assert auroc(s_in, s_out + 1.0) < before
    assert fpr_at_tpr(s_in, s_out - 1.0) < fpr_at_tpr(s_in, s_out)


def test_evaluate_keys_order_and_types():
    s_in, s_out = _random_scores(0, ties=True)
    m = evaluate(s_in, s_out)
    assert tuple(m) == METRIC_NAMES
    assert all(type(v) is float for v in m.values())
    assert m["fpr_at_95_tpr"] == fpr_at_tpr(s_in, s_out, 0.95)
    assert m["fpr_at_80_tpr"] == fpr_at_tpr(s_in, s_out, 0.80)
    assert m["fpr_at_80_tpr"] <= m["fpr_at_95_tpr"]


@pytest.mark.parametrize(
    "s_in, s_out, match",
    [
        ([], [1.0], "scores_in must be non-empty"),
        ([1.0], [], "scores_out must be non-empty"),
        ([1.0, np.nan], [0.0], "scores_in must be finite"),
        ([1.0], [0.0, np.inf], "scores_out must be finite"),
        (np.ones((2, 2)), [0.0], "scores_in must be 1-D"),
        ([1.0], 0.0, "scores_out must be 1-D"),
    ],
)
@pytest.mark.parametrize("fn", [roc_curve, auroc, aupr_in, aupr_out, fpr_at_tpr, detection_error, evaluate])
def test_input_validation(fn, s_in, s_out, match):
    with pytest.raises(ValueError, match=match):
        fn(s_in, s_out)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_fpr_at_tpr_rejects_bad_target(bad):
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_tpr([1.0, 2.0], [0.0], bad)
