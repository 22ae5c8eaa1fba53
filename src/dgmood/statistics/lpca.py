"""Local intrinsic dimension by local PCA with the Fukunaga–Olsen rule (LPCA), batched in torch."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

__all__ = ["LPCA", "fukunaga_olsen", "lpca", "mean_lpca", "neighbourhood_eigenvalues", "symmetric_eigenvalues"]


def neighbourhood_eigenvalues(neighbourhoods: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of each neighbourhood's sample covariance, descending.

    A neighbourhood of k points in D dimensions is centred on its own mean. When D <= k the D x D
    covariance is decomposed, otherwise the k x k Gram matrix, whose nonzero eigenvalues are the same
    (Σ = AᵀA/(k-1) and AAᵀ/(k-1) share their nonzero spectrum); either way m = min(k, D) values come back.

    Arguments:
        neighbourhoods: shape (B, k, D), floating point.

    Returns:
        shape (B, m), the explained variances (divisor k - 1, as ``sklearn.decomposition.PCA``).
    """
    _, k, dim = neighbourhoods.shape
    a = neighbourhoods - neighbourhoods.mean(dim=1, keepdim=True)
    cross = a.mT @ a if dim <= k else a @ a.mT
    return symmetric_eigenvalues(cross / max(k - 1, 1)).flip(-1)


def symmetric_eigenvalues(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, ascending, of a batch (B, m, m) of symmetric matrices: LAPACK's ``syevd`` through numpy, one
    matrix per thread (as many threads as torch has), each single-threaded.

    Same values as ``torch.linalg.eigvalsh``, faster here: for 16 matrices of 784 × 784 on 2 cores, 0.48 s against
    1.39 s for torch's batched call with OpenMP's passive waiting (dgmood's default), which parallelises the
    tridiagonal reduction of each matrix poorly (docs/results.md)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    mats = matrices.detach().cpu().numpy()
    with threadpool_limits(1), ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        values = list(pool.map(np.linalg.eigvalsh, mats))
    return torch.from_numpy(np.stack(values) if values else np.empty(mats.shape[:2], mats.dtype)).to(matrices.device)


def fukunaga_olsen(eigenvalues: torch.Tensor, alpha_fo: float, scale: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Fukunaga–Olsen dimension: the number of eigenvalues above ``alpha_fo`` times the largest.

    Arguments:
        eigenvalues: shape (B, m), descending.
        alpha_fo: relative threshold in (0, 1).
        scale: shape (B,) or scalar; when the largest eigenvalue is at most ``eps * scale`` (a
            neighbourhood spread below floating-point resolution, e.g. repeated points) the
            dimension is 0 rather than a count of rounding noise.

    Returns:
        shape (B,), int64.
    """
    top = eigenvalues[:, :1]
    count = (eigenvalues > alpha_fo * top).sum(dim=-1)
    flat = top[:, 0] <= torch.finfo(eigenvalues.dtype).eps * torch.as_tensor(scale, dtype=eigenvalues.dtype)
    return torch.where(flat, torch.zeros_like(count), count)


def _check_positive(n_neighbors: int) -> None:
    if not isinstance(n_neighbors, (int, np.integer)) or isinstance(n_neighbors, bool) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}")


def _check_k(n_neighbors: int, available: int, what: str) -> None:
    _check_positive(n_neighbors)
    if n_neighbors > available:
        raise ValueError(f"n_neighbors={n_neighbors} exceeds the {available} reference points available {what}")


def _check_alpha(alpha_fo: float) -> None:
    if not 0.0 < alpha_fo < 1.0:
        raise ValueError(f"alpha_fo must lie in (0, 1), got {alpha_fo!r}")


def _lpca_from_indices(X: np.ndarray, indices: np.ndarray, alpha_fo: float, batch_size: int = 16,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> np.ndarray:
    """LPCA of each row of ``indices`` (shape (n_query, k)), the neighbourhoods as rows of ``X``."""
    data = torch.as_tensor(X, dtype=dtype, device=device)
    index = torch.as_tensor(indices, device=device)
    out = []
    for rows in index.split(batch_size):
        hood = data[rows]
        scale = hood.square().sum(-1).amax(-1)
        out.append(fukunaga_olsen(neighbourhood_eigenvalues(hood), alpha_fo, scale))
    return torch.cat(out).cpu().numpy().astype(np.int64)


def _self_excluded_neighbours(X: np.ndarray, query_index: np.ndarray, n_neighbors: int) -> np.ndarray:
    """The n_neighbors nearest rows of X to each X[query_index], the query row itself left out."""
    nn = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(X)
    ind = nn.kneighbors(X[query_index], return_distance=False)
    not_self_first = np.argsort(ind == query_index[:, None], axis=1, kind="stable")
    return np.take_along_axis(ind, not_self_first[:, :n_neighbors], axis=1)


def lpca(
    X,
    n_neighbors: int = 1000,
    alpha_fo: float = 0.001,
    query=None,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Pointwise LID by local PCA with the Fukunaga–Olsen rule.

    For each query point take its ``n_neighbors`` nearest neighbours (Euclidean) in ``X``, centre them
    on their mean, and count the covariance eigenvalues λ_i with λ_i > α λ_max, α = ``alpha_fo``
    (Fukunaga & Olsen 1971; the rule of scikit-dimension's ``lPCA(ver="FO")``). A neighbourhood
    with no spread at all (repeated points) has LID 0.

    Arguments:
        X: reference points, shape (n, D).
        n_neighbors: neighbourhood size k; at most n - 1 when ``query`` is None, else at most n.
        alpha_fo: relative eigenvalue threshold α in (0, 1); 0.001 in the dual-threshold paper.
        query: points to estimate at, shape (n_query, D). None: every point of ``X``, each one's
            neighbourhood leaving out the point itself (as scikit-dimension's ``fit_pw``).
        batch_size: neighbourhoods decomposed at once (memory ~ batch_size * k * D * 8 bytes).
        device: torch device of the eigen-decompositions.
        dtype: their torch dtype; float32 is about twice as fast and may move an eigenvalue that
            sits within rounding of the threshold across it.

    Returns:
        shape (n_query,) (or (n,)), int64, each in [0, min(k, D)].

    References:
        Fukunaga & Olsen, An algorithm for finding intrinsic dimensionality of data, IEEE Trans.
        Computers, 1971. Bac et al., scikit-dimension, Entropy 2021.

    Example:
        >>> from dgmood.data.toy import embedded_gaussian
        >>> lpca(embedded_gaussian(500, 3, 12), n_neighbors=50)[:5]
        array([3, 3, 3, 3, 3])
    """
    X = check_array(X, dtype=np.float64, input_name="X")
    _check_alpha(alpha_fo)
    if query is None:
        _check_k(n_neighbors, len(X) - 1, "(n - 1: each point's own row is left out)")
        indices = _self_excluded_neighbours(X, np.arange(len(X)), n_neighbors)
    else:
        query = check_array(query, dtype=np.float64, input_name="query")
        if query.shape[1] != X.shape[1]:
            raise ValueError(f"query has {query.shape[1]} features but X has {X.shape[1]}")
        _check_k(n_neighbors, len(X), "in X")
        indices = NearestNeighbors(n_neighbors=n_neighbors).fit(X).kneighbors(query, return_distance=False)
    return _lpca_from_indices(X, indices, alpha_fo, batch_size, device, dtype)


def mean_lpca(
    X,
    n_neighbors: int = 1000,
    alpha_fo: float = 0.001,
    n_queries: int | None = None,
    seed: int = 0,
    **kwargs,
) -> float:
    """Mean LPCA over the points of ``X`` (or a random subset), neighbourhoods drawn from all of ``X``.

    This is the calibration target of the dual-threshold method (METHODS.md §3).

    Arguments:
        X: shape (n, D).
        n_neighbors, alpha_fo: as :func:`lpca`; each query's own row is left out of its neighbourhood.
        n_queries: average over this many points drawn without replacement (None: all n).
        seed: seed of ``numpy.random.default_rng`` for the draw.
        **kwargs: ``batch_size``, ``device`` and ``dtype`` of :func:`lpca`.

    Returns:
        the mean LID, a float.
    """
    X = check_array(X, dtype=np.float64, input_name="X")
    _check_alpha(alpha_fo)
    _check_k(n_neighbors, len(X) - 1, "(n - 1: each point's own row is left out)")
    if n_queries is None or n_queries >= len(X):
        return float(lpca(X, n_neighbors, alpha_fo, **kwargs).mean())
    if n_queries < 1:
        raise ValueError(f"n_queries must be a positive integer or None, got {n_queries!r}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(X), size=n_queries, replace=False))
    indices = _self_excluded_neighbours(X, chosen, n_neighbors)
    return float(_lpca_from_indices(X, indices, alpha_fo, **kwargs).mean())


class LPCA(TransformerMixin, BaseEstimator):
    """Pointwise LPCA as a scikit-learn transformer: fit stores the reference set, transform scores new points.

    ``transform(Q)`` returns the LID of each row of ``Q`` from its ``n_neighbors`` nearest reference
    points (a query that is itself a reference point is its own nearest neighbour, unlike
    :func:`lpca` with ``query=None``). Higher = locally higher-dimensional.

    Arguments:
        n_neighbors: neighbourhood size; when larger than the reference set it is reduced to the
            reference-set size with a warning (as ``LocalOutlierFactor``).
        alpha_fo: Fukunaga–Olsen relative threshold in (0, 1).

    Attributes:
        reference_: the reference points, shape (n, D), float64.
        neighbours_: the ``NearestNeighbors`` index of ``reference_``.
        n_neighbors_: the neighbourhood size actually used.
        n_features_in_: D.

    Example:
        >>> from dgmood.data.toy import embedded_gaussian
        >>> est = LPCA(n_neighbors=50).fit(embedded_gaussian(500, 3, 12))
        >>> est.transform(embedded_gaussian(4, 3, 12, seed=1)).ravel()
        array([3., 3., 3., 3.])
    """

    def __init__(self, n_neighbors: int = 1000, alpha_fo: float = 0.001):
        self.n_neighbors = n_neighbors
        self.alpha_fo = alpha_fo

    def fit(self, X, y=None):
        """Store ``X`` (shape (n, D)) as the reference set; ``y`` is ignored. Returns self."""
        X = validate_data(self, X, dtype=np.float64)
        _check_alpha(self.alpha_fo)
        _check_positive(self.n_neighbors)
        self.n_neighbors_ = min(self.n_neighbors, len(X))
        if self.n_neighbors_ < self.n_neighbors:
            warnings.warn(f"n_neighbors={self.n_neighbors} exceeds the {len(X)} reference points; using {len(X)}",
                          UserWarning, stacklevel=2)
        self.reference_ = X
        self.neighbours_ = NearestNeighbors(n_neighbors=self.n_neighbors_).fit(X)
        return self

    def transform(self, X):
        """LID of each row of ``X`` (shape (n_query, D)) as a float64 column, shape (n_query, 1)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        indices = self.neighbours_.kneighbors(X, return_distance=False)
        return _lpca_from_indices(self.reference_, indices, self.alpha_fo).astype(np.float64)[:, None]
