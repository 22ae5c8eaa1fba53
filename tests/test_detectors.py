"""Tests for dgmood.detectors.estimators: the scikit-learn contract, known answers and an AUROC floor."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from dgmood.detectors.estimators import CombinedDetector, FlowDetector, GMMDetector, KNNDetector
from dgmood.detectors.threshold import ThresholdDetector

DIM = 10
N_TRAIN = 3000
N_TEST = 4000

# Small settings so that the ~50 estimator checks (one or more fits each) stay fast.
CHECKED = [
    KNNDetector(),
    GMMDetector(component_grid=(1, 2, 3), cv=3),
    FlowDetector(hidden_features=(16, 16), transforms=2, max_epochs=3, batch_size=32),
    CombinedDetector(distance_columns=0, component_grid=(1, 2, 3), cv=3),
    CombinedDetector(distance_columns=1, component_grid=(1, 2, 3), cv=3),
    CombinedDetector(distance_columns=0, hinge_columns=1, component_grid=(1, 2, 3), cv=3),
    CombinedDetector(distance_columns=1, term_shape="softplus", component_grid=(1, 2, 3), cv=3),
    CombinedDetector(distance_columns=1, term_shape="softplus", extreme_weight=1.0, component_grid=(1, 2, 3), cv=3),
    ThresholdDetector(),
    ThresholdDetector(sign=1, acceptance=0.5),
]


def small_flow(**kwargs) -> FlowDetector:
    """A flow that fits 3000 x 10 rows in a few seconds on one thread."""
    params = dict(hidden_features=(32, 32), transforms=3, max_epochs=40, batch_size=128, patience=5)
    return FlowDetector(**{**params, **kwargs})


DETECTORS = {
    "knn": KNNDetector,
    "gmm": lambda: GMMDetector(max_components=6, cv=5),
    "flow": small_flow,
    "combined": lambda: CombinedDetector(max_components=6, cv=5),
}



@pytest.fixture(scope="module")
def gaussian_data():
    rng = np.random.default_rng(0)
    return {
        "train": rng.standard_normal((N_TRAIN, DIM)),
        "test": rng.standard_normal((N_TEST, DIM)),
        "shifted": rng.standard_normal((N_TEST, DIM)) + 1.5,
        "scaled": 3.0 * rng.standard_normal((N_TEST, DIM)),
    }


@pytest.fixture(scope="module")
def fitted(gaussian_data):
    return {name: make().fit(gaussian_data["train"]) for name, make in DETECTORS.items()}


@parametrize_with_checks(CHECKED)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("shift", ["shifted", "scaled"])
def test_auroc_floor_on_synthetic_shift(fitted, gaussian_data, name, shift):
    detector = fitted[name]
    s_in, s_out = detector.score_samples(gaussian_data["test"]), detector.score_samples(gaussian_data[shift])
    labels = np.r_[np.ones_like(s_in), np.zeros_like(s_out)]
    assert roc_auc_score(labels, np.r_[s_in, s_out]) >= 0.95


@pytest.mark.parametrize("name", DETECTORS)
def test_heldout_acceptance_near_target(fitted, gaussian_data, name):
    accepted = np.mean(fitted[name].predict(gaussian_data["test"]) == 1)
    assert accepted == pytest.approx(0.95, abs=0.025)


@pytest.mark.parametrize("name", ["gmm", "flow"])
def test_training_acceptance_matches_parameter(gaussian_data, name):
    X = gaussian_data["train"][:1000]
    detector = DETECTORS[name]().set_params(acceptance=0.8).fit(X)
    assert np.mean(detector.predict(X) == 1) == pytest.approx(0.8, abs=2e-3)


@pytest.mark.parametrize("name", DETECTORS)
def test_sign_and_threshold(fitted, gaussian_data, name):
    detector = fitted[name]
    X = gaussian_data["test"][:500]
    scores = detector.score_samples(X)
    np.testing.assert_allclose(detector.decision_function(X), scores - detector.offset_)
    np.testing.assert_array_equal(detector.predict(X), np.where(scores >= detector.offset_, 1, -1))
    far = np.full((1, DIM), 8.0)
    assert detector.score_samples(far)[0] < scores.min()
    assert detector.predict(far)[0] == -1


@pytest.mark.parametrize("name", ["gmm", "flow"])
def test_fixed_random_state_gives_identical_scores(gaussian_data, name):
    X = gaussian_data["train"][:1000]
    first = DETECTORS[name]().set_params(random_state=3).fit(X).score_samples(X)
    second = DETECTORS[name]().set_params(random_state=3).fit(X).score_samples(X)
    np.testing.assert_array_equal(first, second)


def test_flow_seeding_leaves_global_rng_alone(gaussian_data):
    X = gaussian_data["train"][:500]
    state = torch.get_rng_state()
    first = small_flow(max_epochs=2, random_state=0).fit(X)
    assert torch.equal(torch.get_rng_state(), state)
    other = small_flow(max_epochs=2, random_state=1).fit(X)
    assert not np.array_equal(first.score_samples(X), other.score_samples(X))


def test_flow_early_stopping_records_curves(gaussian_data):
    detector = small_flow(max_epochs=200, patience=2).fit(gaussian_data["train"][:1000])
    assert detector.n_epochs_ < 200
    assert detector.n_epochs_ == len(detector.loss_curve_) == len(detector.validation_loss_curve_)
    assert detector.best_epoch_ == 1 + int(np.argmin(detector.validation_loss_curve_))
    assert detector.n_epochs_ - detector.best_epoch_ == 2


def test_flow_heldout_likelihood_near_gaussian_entropy(fitted, gaussian_data):
    entropy = 0.5 * DIM * np.log(2 * np.pi * np.e)
    assert -fitted["flow"].score_samples(gaussian_data["test"]).mean() == pytest.approx(entropy, abs=0.3)


def test_gmm_single_component_is_the_gaussian_mle():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2000, 3)) @ np.array([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.3, 5.0]]) + 7.0
    detector = GMMDetector(component_grid=(1,), reg_covar=1e-12).fit(X)
    expected = multivariate_normal(X.mean(axis=0), np.cov(X, rowvar=False, bias=True)).logpdf(X)
    np.testing.assert_allclose(detector.score_samples(X), expected, rtol=1e-8)
    assert detector.n_components_ == 1 and detector.cv_scores_ == {}


def blobs(n_clusters: int, n: int = 1500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 8.0 * np.eye(3)[:n_clusters]
    return rng.standard_normal((n, 3)) + centres[rng.integers(n_clusters, size=n)]


@pytest.mark.parametrize("n_clusters", [2, 3])
def test_gmm_cross_validation_finds_the_clusters(n_clusters):
    detector = GMMDetector(component_grid=range(1, 7), cv=5).fit(blobs(n_clusters))
    assert detector.n_components_ == n_clusters
    assert set(detector.cv_scores_) == set(range(1, 7))
    assert max(detector.cv_scores_, key=detector.cv_scores_.get) == n_clusters


def test_gmm_default_grid_on_clusters():
    assert GMMDetector(cv=5).fit(blobs(2)).n_components_ == 2
    assert GMMDetector(cv=5).fit(blobs(3)).n_components_ > 1


def test_gmm_tiny_input_clips_grid_and_folds():
    X = np.random.default_rng(2).standard_normal((12, 3))
    detector = GMMDetector().fit(X)
    assert detector.n_components_ == 2 and detector.cv_scores_ == {}
    assert GMMDetector().fit(X[:4]).n_components_ == 1
    assert np.all(np.isfinite(detector.score_samples(X)))


def test_gmm_cv_subsample_is_used_for_selection_only():
    X = blobs(2, n=3000)
    detector = GMMDetector(component_grid=(1, 2, 3), cv=3, cv_max_samples=500).fit(X)
    assert detector.n_components_ == 2
    assert detector.gmm_.weights_.sum() == pytest.approx(1.0)
    assert detector.gmm_.means_.shape == (2, 3)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((200, 4)), rng.standard_normal((50, 4))
    detector = KNNDetector(n_neighbors=3, standardize=False, acceptance=0.9).fit(X)
    distances = np.linalg.norm(Y[:, None, :] - X[None, :, :], axis=-1)
    np.testing.assert_allclose(detector.score_samples(Y), -np.sort(distances, axis=1)[:, 2])
    self_distances = np.linalg.norm(X[:, None, :] - X[None, :, :], axis=-1)
    training_scores = -np.sort(self_distances, axis=1)[:, 3]
    assert detector.offset_ == pytest.approx(np.quantile(training_scores, 0.1))


def test_knn_training_rows_match_themselves():
    X = np.random.default_rng(4).standard_normal((100, 2))
    detector = KNNDetector(n_neighbors=1).fit(X)
    np.testing.assert_array_equal(detector.score_samples(X), 0.0)
    assert detector.offset_ < 0


def test_knn_clips_neighbours_on_tiny_input():
    with pytest.warns(UserWarning, match="n_neighbors"):
        detector = KNNDetector(n_neighbors=5).fit(np.arange(8.0).reshape(4, 2))
    assert detector.n_neighbors_ == 3


@pytest.mark.parametrize("name", DETECTORS)
def test_nan_input_raises(fitted, gaussian_data, name):
    X = gaussian_data["train"][:50].copy()
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DETECTORS[name]().fit(X)
    with pytest.raises(ValueError, match="NaN"):
        fitted[name].score_samples(X)


@pytest.mark.parametrize("name", DETECTORS)
def test_wrong_number_of_features_raises(fitted, gaussian_data, name):
    with pytest.raises(ValueError, match="features"):
        fitted[name].score_samples(gaussian_data["test"][:, :-1])
    with pytest.raises(ValueError, match="features"):
        fitted[name].predict(np.ones((3, DIM + 1)))


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("acceptance", [0.0, 1.5])
def test_invalid_acceptance_raises(gaussian_data, name, acceptance):
    with pytest.raises(ValueError, match="acceptance"):
        DETECTORS[name]().set_params(acceptance=acceptance).fit(gaussian_data["train"][:50])


def test_combined_score_is_standardised_density_minus_weighted_distance():
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.standard_normal((400, 3)), rng.lognormal(size=400)])
    det = CombinedDetector(distance_columns=1, distance_weight=2.0, component_grid=(1,), cv=2).fit(X)
    Z = (X - X.mean(0)) / X.std(0)
    density = multivariate_normal(Z[:, :3].mean(0), np.cov(Z[:, :3].T, bias=True)).logpdf(Z[:, :3])
    expected = (density - density.mean()) / density.std() - 2.0 * Z[:, 3]
    np.testing.assert_allclose(det.score_samples(X), expected, rtol=1e-4, atol=1e-4)
    assert det.gmm_.means_.shape == (1, 3)  # the distance column is not modelled by the mixture


def test_combined_hinge_columns_penalise_only_values_above_the_training_mean():
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.standard_normal((400, 3)), rng.standard_normal(400), rng.lognormal(size=400)])
    det = CombinedDetector(distance_columns=1, hinge_columns=1, hinge_weight=0.5, component_grid=(1,), cv=2).fit(X)
    Z = (X - X.mean(0)) / X.std(0)
    density = multivariate_normal(Z[:, :3].mean(0), np.cov(Z[:, :3].T, bias=True)).logpdf(Z[:, :3])
    expected = (density - density.mean()) / density.std() - 0.5 * np.maximum(Z[:, 3], 0) - Z[:, 4]
    np.testing.assert_allclose(det.score_samples(X), expected, rtol=1e-4, atol=1e-4)
    assert det.gmm_.means_.shape == (1, 3)  # neither the hinge nor the distance column is in the mixture
    low, high = X[:2].copy(), X[:2].copy()
    low[:, 3], high[:, 3] = X[:, 3].mean() - 5 * X[:, 3].std(), X[:, 3].mean() + 5 * X[:, 3].std()
    at_mean = X[:2].copy()
    at_mean[:, 3] = X[:, 3].mean()
    np.testing.assert_allclose(det.score_samples(low), det.score_samples(at_mean), atol=1e-9)
    np.testing.assert_allclose(det.score_samples(at_mean) - det.score_samples(high), 2.5, rtol=1e-6)


def test_combined_softplus_terms_match_eq_c2():
    rng = np.random.default_rng(4)
    X = np.column_stack([rng.standard_normal((400, 3)), rng.standard_normal(400), rng.lognormal(size=400)])
    det = CombinedDetector(distance_columns=1, hinge_columns=1, hinge_weight=0.5, distance_weight=2.0,
                           term_shape="softplus", component_grid=(1,), cv=2).fit(X)
    Z = (X - X.mean(0)) / X.std(0)
    density = multivariate_normal(Z[:, :3].mean(0), np.cov(Z[:, :3].T, bias=True)).logpdf(Z[:, :3])
    u_q = (density.mean() - density) / density.std()
    expected = -np.log1p(np.exp(u_q)) - 0.5 * np.log1p(np.exp(Z[:, 3])) - 2.0 * np.log1p(np.exp(Z[:, 4]))
    np.testing.assert_allclose(det.score_samples(X), expected, rtol=1e-4, atol=1e-4)


def test_combined_softplus_terms_let_no_typical_term_buy_off_another():
    """Eq. C2: a far-out distance costs as under eq. C1, but an extremely near one gains at most log 2 against an
    average one, where eq. C1 rewards it without bound."""
    rng = np.random.default_rng(5)
    X = np.column_stack([rng.standard_normal((400, 3)), rng.lognormal(size=400)])
    linear, soft = (CombinedDetector(distance_columns=1, term_shape=shape, component_grid=(1,), cv=2).fit(X)
                    for shape in ("linear", "softplus"))
    mean, std = X[:, 3].mean(), X[:, 3].std()
    rows = np.repeat(X[:1], 3, axis=0)
    rows[:, 3] = mean - 8 * std, mean, mean + 8 * std  # near, average, far
    gain = {name: det.score_samples(rows[:2]) @ [1, -1] for name, det in (("linear", linear), ("soft", soft))}
    assert gain["linear"] == pytest.approx(8.0, rel=1e-6) and 0 < gain["soft"] < np.log(2)
    far_cost = {name: det.score_samples(rows[1:]) @ [1, -1] for name, det in (("linear", linear), ("soft", soft))}
    assert far_cost["soft"] == pytest.approx(8.0 - np.log(2), abs=1e-3) and far_cost["linear"] == pytest.approx(8.0)
    assert (soft.score_samples(X) < 0).all()  # every term costs something: the score is below 0


def test_combined_extreme_term_matches_eq_c3():
    rng = np.random.default_rng(6)
    X = np.column_stack([rng.standard_normal((400, 3)), rng.lognormal(size=400)])
    plain = CombinedDetector(distance_columns=1, term_shape="softplus", component_grid=(1,), cv=2).fit(X)
    det = CombinedDetector(distance_columns=1, term_shape="softplus", extreme_weight=0.5, component_grid=(1,),
                           cv=2).fit(X)
    Z = (X - X.mean(0)) / X.std(0)
    largest = np.abs(Z[:, :3]).max(axis=1)  # the mixture's columns only, not the distance
    u_e = (largest - largest.mean()) / largest.std()
    expected = plain.score_samples(X) - 0.5 * np.log1p(np.exp(u_e))
    np.testing.assert_allclose(det.score_samples(X), expected, rtol=1e-6, atol=1e-6)


def test_combined_extreme_term_finds_one_far_statistic_the_mixture_dilutes():
    """Eq. C3: two rows at the same Gaussian density (Mahalanobis distance 4), one 4 standard deviations out in one
    statistic, the other 4/√10 out in each of ten; the mixture alone scores them equal, the extreme term ranks the
    single far statistic lower."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((20000, 10))
    X = (X - X.mean(0)) / X.std(0)
    rows = np.zeros((2, 10))
    rows[0, 0] = 4.0
    rows[1, :] = 4.0 / np.sqrt(10)
    plain, extreme = (CombinedDetector(distance_columns=0, term_shape="softplus", extreme_weight=w,
                                       component_grid=(1,), cv=2).fit(X) for w in (0.0, 1.0))
    assert plain.score_samples(rows) == pytest.approx(plain.score_samples(rows)[::-1], abs=0.05)
    one, spread = extreme.score_samples(rows)
    assert one < spread - 1.0


def test_combined_rejects_an_unknown_term_shape():
    X = np.random.default_rng(0).standard_normal((50, 3))
    with pytest.raises(ValueError, match="term_shape must be one of linear, softplus"):
        CombinedDetector(term_shape="quadratic").fit(X)


def test_combined_rejects_distance_columns_that_leave_no_statistic():
    X = np.random.default_rng(0).standard_normal((50, 2))
    with pytest.raises(ValueError, match="distance_columns"):
        CombinedDetector(distance_columns=2).fit(X)
    with pytest.raises(ValueError, match="hinge_columns"):
        CombinedDetector(distance_columns=1, hinge_columns=1).fit(X)


def test_the_combined_recipe_adds_its_terms_by_eq_c2_unless_told_otherwise():
    from dgmood.methods.recipes import MethodConfig, build_detector
    from dgmood.models.network import NetConfig, ScoreNet

    model = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8,)))
    shapes = [build_detector("combined", model, "score", config).estimator.term_shape
              for config in (MethodConfig(), MethodConfig(term_shape="linear"))]
    assert shapes == ["softplus", "linear"]
    with pytest.raises(ValueError, match="term_shape must be 'linear' or 'softplus'"):
        MethodConfig(term_shape="max")


def test_the_combined_recipe_adds_the_extreme_term_only_when_asked():
    from dgmood.methods.recipes import MethodConfig, build_detector
    from dgmood.models.network import NetConfig, ScoreNet

    model = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8,)))
    weights = [build_detector("combined", model, "score", config).estimator.extreme_weight
               for config in (MethodConfig(), MethodConfig(extreme_weight=1.0))]
    assert weights == [0.0, 1.0]
    # detectors saved before the term existed hold no extreme_weight in their settings: they still match
    assert "extreme_weight" not in MethodConfig().to_dict() and MethodConfig(extreme_weight=1.0).to_dict()["extreme_weight"] == 1.0
    with pytest.raises(ValueError, match="extreme_weight must be >= 0"):
        MethodConfig(extreme_weight=-1.0)
