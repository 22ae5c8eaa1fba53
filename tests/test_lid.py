"""Tests for dgmood.statistics.lpca (LPCA) and dgmood.data.toy: manifolds of known LID, a PCA reference, the contract."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.estimator_checks import check_estimator

from dgmood.statistics.lpca import LPCA, fukunaga_olsen, lpca, mean_lpca, neighbourhood_eigenvalues, symmetric_eigenvalues
from dgmood.data.toy import LOLLIPOP_CENTRE, LOLLIPOP_JUNCTION, LOLLIPOP_RADIUS, embedded_gaussian, lollipop


def _decaying(n=600, dim=30, seed=0):
    """Gaussian data whose variances fall from 1 to 1e-5, so FO counts sit well inside (0, dim)."""
    return np.random.default_rng(seed).standard_normal((n, dim)) * np.logspace(0, -2.5, dim)


def _reference_lpca(X, k, alpha, query=None):
    """Straight from the definition, with sklearn's PCA (the computation scikit-dimension's lPCA 'FO' does)."""
    if query is None:
        ind = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=False)
    else:
        ind = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(query, return_distance=False)
    ev = [PCA().fit(X[i]).explained_variance_ for i in ind]
    return np.array([np.sum(e > alpha * e[0]) for e in ev])


# Known dimension. A linear embedding puts every kNN neighbourhood on a d-dimensional subspace, so
# the covariance has exactly d nonzero eigenvalues (the rest are rounding, ~1e-16 of the largest).
# FO can then only err if a tangent eigenvalue falls below 1e-3 of the largest; for k >= 20 d
# neighbours from an isotropic Gaussian the smallest/largest ratio is ~0.3, so LPCA is exact at
# every point: the tolerance is 0, not |mean - d| <= 1.
@pytest.mark.parametrize("d, ambient, rotate", [(2, 20, False), (5, 30, True), (10, 50, True)])
def test_embedded_gaussian_exact(d, ambient, rotate):
    X = embedded_gaussian(2000, d, ambient, seed=d, rotate=rotate)
    assert np.linalg.matrix_rank(X) == d
    est = lpca(X, n_neighbors=200)
    assert est.shape == (2000,) and est.dtype == np.int64
    assert np.all(est == d)
    assert mean_lpca(X, n_neighbors=200, n_queries=100) == d


# Off-manifold noise of variance σ² is ignored while σ² < α λ_min(tangent); here σ² = 1e-6 against a
# tangent variance ~0.1 and α λ_max ~ 3e-4, so the estimate is still exactly d.
def test_embedded_gaussian_small_noise_ignored():
    X = embedded_gaussian(2000, 5, 30, seed=1, rotate=True)
    X += 1e-3 * np.random.default_rng(2).standard_normal(X.shape)
    assert np.all(lpca(X, n_neighbors=150) == 5)


def test_embedded_gaussian_repeats_coordinates():
    X = embedded_gaussian(50, 3, 8)
    np.testing.assert_array_equal(X[:, 3:6], X[:, :3])
    np.testing.assert_array_equal(X[:, 6:], X[:, :2])
    Q = embedded_gaussian(50, 3, 8, rotate=True)
    np.testing.assert_allclose(np.linalg.norm(Q, axis=1), np.linalg.norm(X, axis=1))


def test_lollipop_geometry():
    X, lid = lollipop(4000, seed=3)
    assert X.shape == (4000, 2) and lid.shape == (4000,) and lid.dtype == np.int64
    assert np.all(np.linalg.norm(X[lid == 2] - LOLLIPOP_CENTRE, axis=1) <= LOLLIPOP_RADIUS)
    stick = X[lid == 1]
    np.testing.assert_allclose(stick[:, 0], stick[:, 1])
    assert stick.min() >= 1.5 and stick.max() <= LOLLIPOP_JUNCTION[0]
    np.testing.assert_array_equal(X[lid == 0], 0.0)
    np.testing.assert_allclose(np.bincount(lid) / 4000, [1 / 7, 2 / 7, 4 / 7], atol=0.03)


# n = 3000, k = 100: ~860 stick points on a stick of length 1.12, so a stick point's neighbourhood
# spans ±0.065 along it; stick points within 0.15 of the junction (2x that) may see the disc and are
# excluded. k stays below the ~430 copies of the dot, whose neighbourhoods are then all (0, 0).
def test_lollipop_lpca():
    X, lid = lollipop(3000, seed=0)
    est = lpca(X, n_neighbors=100)
    near_junction = np.linalg.norm(X - LOLLIPOP_JUNCTION, axis=1) < 0.15
    assert np.all(est[lid == 2] == 2)
    assert np.all(est[(lid == 1) & ~near_junction] == 1)
    assert np.all(est[lid == 0] == 0)
    assert np.all(est[(lid == 1) & near_junction] >= 1)


@pytest.mark.parametrize("k, dim", [(20, 50), (50, 8), (30, 30)])
def test_gram_path_matches_covariance(k, dim):
    hoods = torch.as_tensor(np.random.default_rng(k).standard_normal((4, k, dim)) * np.logspace(0, -3, dim))
    ev = neighbourhood_eigenvalues(hoods)
    assert ev.shape == (4, min(k, dim))
    a = hoods - hoods.mean(1, keepdim=True)
    cov = torch.linalg.eigvalsh(a.mT @ a / (k - 1)).flip(-1)[:, : min(k, dim)]
    torch.testing.assert_close(ev, cov, rtol=1e-9, atol=1e-12 * float(cov.max()))
    for i in range(4):
        np.testing.assert_allclose(ev[i].numpy(), PCA().fit(hoods[i].numpy()).explained_variance_,
                                   rtol=1e-9, atol=1e-12 * float(cov.max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_eigenvalues_match_torch(dtype):
    a = torch.as_tensor(np.random.default_rng(0).standard_normal((5, 40, 12)), dtype=dtype)
    mats = a.mT @ a
    ev = symmetric_eigenvalues(mats)
    assert ev.dtype == dtype and ev.shape == (5, 12)
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(mats))
    assert symmetric_eigenvalues(mats[:0]).shape == (0, 12)


@pytest.mark.parametrize("dim, k", [(30, 20), (30, 60)])
def test_matches_pca_reference(dim, k):
    X = _decaying(dim=dim)
    est = lpca(X, n_neighbors=k, alpha_fo=0.001)
    assert 3 < est.mean() < dim - 3
    np.testing.assert_array_equal(est, _reference_lpca(X, k, 0.001))


def test_query_path():
    X = _decaying(seed=1)
    Q = _decaying(n=40, seed=2)
    est = lpca(X, n_neighbors=50, query=Q)
    assert est.shape == (40,) and est.dtype == np.int64
    np.testing.assert_array_equal(est, _reference_lpca(X, 50, 0.001, query=Q))
    G = embedded_gaussian(1000, 4, 16, rotate=True)
    assert np.all(lpca(G[:900], n_neighbors=100, query=G[900:]) == 4)


def test_query_none_leaves_the_point_out():
    X = _decaying(seed=4)
    with_self = lpca(X, n_neighbors=25, query=X)
    without = lpca(X, n_neighbors=25)
    np.testing.assert_array_equal(with_self, _reference_lpca(X, 25, 0.001, query=X))
    np.testing.assert_array_equal(without, _reference_lpca(X, 25, 0.001))


def test_mean_lpca_subset():
    X = _decaying(seed=5)
    per_point = lpca(X, n_neighbors=40)
    assert mean_lpca(X, n_neighbors=40) == pytest.approx(per_point.mean())
    chosen = np.random.default_rng(7).choice(len(X), size=100, replace=False)
    assert mean_lpca(X, n_neighbors=40, n_queries=100, seed=7) == pytest.approx(per_point[chosen].mean())


def test_float32_and_batching_agree():
    X = embedded_gaussian(500, 3, 12)
    np.testing.assert_array_equal(lpca(X, 60, dtype=torch.float32, batch_size=7), lpca(X, 60))


def test_fukunaga_olsen_rule():
    ev = torch.tensor([[4.0, 1.0, 0.0041, 0.001], [4.0, 1.0, 0.004, 0.0], [0.0, 0.0, 0.0, 0.0],
                       [1e-20, 1e-21, 0.0, 0.0]], dtype=torch.float64)
    # strictly above alpha * lambda_max (0.004 itself does not count); a spread below rounding is 0
    np.testing.assert_array_equal(fukunaga_olsen(ev, 0.001, scale=1.0).numpy(), [3, 2, 0, 0])
    np.testing.assert_array_equal(fukunaga_olsen(ev, 0.3, scale=1.0).numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(fukunaga_olsen(ev, 0.001).numpy(), [3, 2, 0, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(X=np.array([[0.0, np.nan]] * 10)), "NaN"),
        (dict(X=np.zeros((10, 2)), query=np.array([[np.inf, 0.0]])), "infinity"),
        (dict(X=np.arange(10.0)), "2D"),
        (dict(X=np.zeros((10, 2)), n_neighbors=10), "n_neighbors=10 exceeds the 9"),
        (dict(X=np.zeros((10, 2)), n_neighbors=11, query=np.zeros((1, 2))), "n_neighbors=11 exceeds the 10"),
        (dict(X=np.zeros((10, 2)), n_neighbors=0), "positive integer"),
        (dict(X=np.zeros((10, 2)), n_neighbors=3, alpha_fo=1.5), "alpha_fo"),
        (dict(X=np.zeros((10, 2)), n_neighbors=3, query=np.zeros((1, 3))), "3 features but X has 2"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lpca(**{"n_neighbors": 3, **kwargs})


def test_toy_bad_input():
    with pytest.raises(ValueError, match="1 <= d <= ambient"):
        embedded_gaussian(10, 5, 3)
    with pytest.raises(ValueError, match="positive"):
        lollipop(0)


def test_estimator_transforms_new_points():
    X = embedded_gaussian(800, 3, 12, seed=0)
    Q = embedded_gaussian(20, 3, 12, seed=1)
    est = LPCA(n_neighbors=60).fit(X)
    out = est.transform(Q)
    assert out.shape == (20, 1) and out.dtype == np.float64
    np.testing.assert_array_equal(out[:, 0], lpca(X, 60, query=Q))
    assert np.all(out == 3)
    with pytest.warns(UserWarning, match="exceeds the 800"):
        assert LPCA().fit(X).n_neighbors_ == 800


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")  # array-API check needs SCIPY_ARRAY_API
@pytest.mark.filterwarnings("ignore:n_neighbors=1000 exceeds:UserWarning")
def test_check_estimator():
    check_estimator(LPCA(n_neighbors=5))
    check_estimator(LPCA())  # the default k = 1000 exceeds every check's data: reduced with a warning


@pytest.mark.parametrize("alpha_fo", [0.05, 0.001])
def test_lpca_matches_scikit_dimension_per_point(alpha_fo):
    """The field's reference: scikit-dimension's lPCA(ver="FO").fit_pw (a test-only dependency)."""
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(1)
    # a mixture of manifolds of dimension 2 and 5 in R^12, with a little noise: the LID varies by point
    low = rng.normal(size=(150, 2)) @ rng.normal(size=(2, 12))
    high = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 12)) + 3.0
    X = np.vstack([low, high]) + 0.01 * rng.normal(size=(300, 12))
    ours = lpca(X, n_neighbors=40, alpha_fo=alpha_fo)
    ref = skdim.id.lPCA(ver="FO", alphaFO=alpha_fo).fit_pw(X, n_neighbors=40, n_jobs=1).dimension_pw_
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref)) > 1  # the comparison covers more than one dimension
