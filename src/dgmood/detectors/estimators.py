"""Outlier detectors (GMM, MAF flow, k-NN) on feature matrices; scores are higher = more in-distribution."""

from __future__ import annotations

import copy
import math
import numbers
import warnings

import numpy as np
import torch
import zuko
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import KFold
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, check_scalar, validate_data

__all__ = ["DETECTORS", "BaseDetector", "CombinedDetector", "FlowDetector", "GMMDetector", "KNNDetector"]

_SCORE_CHUNK = 8192


def _seed(random_state) -> int:
    """A 31-bit integer seed drawn from ``random_state`` (None, int or RandomState), as sklearn does."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class BaseDetector(OutlierMixin, BaseEstimator):
    """Shared contract of the dgmood detectors, fitted on in-distribution features only.

    Sign convention: ``score_samples`` is higher for more in-distribution inputs. ``fit`` sets
    ``offset_`` to the ``1 - acceptance`` quantile of the training scores, so that about a fraction
    ``acceptance`` of in-distribution data has ``decision_function = score_samples - offset_ >= 0``
    and is predicted +1 (in-distribution); the rest is predicted -1 (OOD).

    Subclasses implement ``_fit(X) -> training scores`` and ``_score_samples(X) -> scores`` on
    validated float64 arrays of shape (n_samples, n_features_in_).
    """

    def fit(self, X, y=None):
        """Fit the density / neighbour model and the acceptance threshold on in-distribution features.

        Args:
            X: array of shape (n_samples, n_features), n_samples >= 2; finite values only.
            y: ignored, present for API consistency.

        Returns:
            self.
        """
        check_scalar(self.acceptance, "acceptance", numbers.Real, min_val=0.0, max_val=1.0,
                     include_boundaries="right")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        train_scores = self._fit(X)
        self.offset_ = float(np.quantile(train_scores, 1.0 - self.acceptance))
        return self

    def score_samples(self, X):
        """In-distribution score, higher = more in-distribution.

        Args:
            X: array of shape (n_samples, n_features_in_).

        Returns:
            float64 array of shape (n_samples,).
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return np.asarray(self._score_samples(X), dtype=np.float64)

    def decision_function(self, X):
        """``score_samples(X) - offset_``: >= 0 means accepted as in-distribution.

        Args:
            X: array of shape (n_samples, n_features_in_).

        Returns:
            float64 array of shape (n_samples,).
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 (in-distribution) where ``decision_function(X) >= 0``, else -1 (OOD).

        Args:
            X: array of shape (n_samples, n_features_in_).

        Returns:
            int array of shape (n_samples,) with values in {-1, +1}.
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def _fit_scaler(self, X: np.ndarray) -> np.ndarray:
        """Fit ``scaler_`` (a StandardScaler, or None when ``standardize`` is False); return scaled X."""
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        return self._standardize(X)

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return X if self.scaler_ is None else self.scaler_.transform(X)

    def _log_abs_det(self) -> float:
        """log |det dZ/dX| of the standardisation, so that log p(x) = log q(z) + this."""
        return 0.0 if self.scaler_ is None else float(-np.log(self.scaler_.scale_).sum())


class GMMDetector(BaseDetector):
    """Gaussian mixture on standardised features; the number of components by cross-validation (MSMA).

    ``score_samples(X)`` is the log-density of X in input units, shape (n_samples,), higher = more
    in-distribution: the mixture's log-likelihood of the standardised features plus the log-Jacobian
    of the standardisation (a constant, so rankings equal those of the standardised log-likelihood).

    The number of components maximises the mean held-out log-likelihood per sample over ``cv`` folds
    among ``component_grid`` (default 2, 4, ..., ``max_components``, as MSMA's code). Grid values are
    dropped when the smallest training fold has fewer than ``n_features + 1`` points per component;
    if none is left, one component is used. ``cv`` is clipped to the number of rows. When the data have
    more than ``cv_max_samples`` rows, the selection uses a random subset of that many rows; the chosen
    mixture is then refitted on all rows.

    Args:
        max_components: largest grid value of the default grid 2, 4, ..., max_components.
        component_grid: explicit candidate numbers of components; overrides ``max_components``.
        cv: number of cross-validation folds (>= 2).
        standardize: standardise each feature (zero mean, unit variance) before fitting.
        acceptance: target fraction of in-distribution data predicted +1, in (0, 1].
        random_state: seed for the subset, the folds and the mixture initialisation.
        cv_max_samples: most rows used for the component selection (None: all rows).
        reg_covar: added to the diagonal of every covariance (standardised units).
        max_iter: most EM iterations per mixture fit.

    Attributes:
        scaler_: fitted StandardScaler, or None.
        n_components_: chosen number of components.
        cv_scores_: dict {n_components: mean held-out log-likelihood per sample}; empty when only one
            candidate was left, so no selection was needed.
        gmm_: the GaussianMixture fitted on all standardised rows.
        n_iter_: EM iterations of that final fit.
        offset_: threshold on ``score_samples``.
    """

    def __init__(self, max_components=20, component_grid=None, cv=10, standardize=True, acceptance=0.95,
                 random_state=0, cv_max_samples=10_000, reg_covar=1e-5, max_iter=200):
        self.max_components = max_components
        self.component_grid = component_grid
        self.cv = cv
        self.standardize = standardize
        self.acceptance = acceptance
        self.random_state = random_state
        self.cv_max_samples = cv_max_samples
        self.reg_covar = reg_covar
        self.max_iter = max_iter

    @property
    def mixture_columns(self) -> int:
        """How many (leading) columns of X the mixture models, once fitted: all of them."""
        return self.n_features_in_

    def _fit(self, X):
        return self._fit_mixture(self._fit_scaler(X)) + self._log_abs_det()

    def _fit_mixture(self, Z):
        """Choose the number of components and fit ``gmm_`` on standardised rows Z; their log-likelihoods (N,)."""
        check_scalar(self.cv, "cv", numbers.Integral, min_val=2)
        rng = check_random_state(self.random_state)
        Z_cv = self._cv_subset(Z, rng)
        n_folds = min(self.cv, len(Z_cv))
        smallest_train_fold = len(Z_cv) - math.ceil(len(Z_cv) / n_folds)
        candidates = [k for k in self._grid() if k * (Z.shape[1] + 1) <= smallest_train_fold] or [1]
        self.cv_scores_ = {}
        if len(candidates) > 1:
            folds = list(KFold(n_folds, shuffle=True, random_state=_seed(rng)).split(Z_cv))
            seed = _seed(rng)
            self.cv_scores_ = {k: self._cv_score(Z_cv, folds, k, seed) for k in candidates}
        self.n_components_ = max(candidates, key=lambda k: self.cv_scores_.get(k, -np.inf))
        self.gmm_ = self._mixture(self.n_components_, _seed(rng)).fit(Z)
        self.n_iter_ = self.gmm_.n_iter_
        return self.gmm_.score_samples(Z)

    def _score_samples(self, X):
        return self.gmm_.score_samples(self._standardize(X)) + self._log_abs_det()

    def _grid(self) -> list[int]:
        if self.component_grid is None:
            check_scalar(self.max_components, "max_components", numbers.Integral, min_val=1)
            return list(range(2, self.max_components + 1, 2)) or [1]
        grid = sorted({int(k) for k in self.component_grid})
        if not grid or grid[0] < 1:
            raise ValueError(f"component_grid must hold positive integers, got {self.component_grid!r}")
        return grid

    def _cv_subset(self, Z, rng) -> np.ndarray:
        """At most ``cv_max_samples`` random rows of Z, for the component selection."""
        if self.cv_max_samples is None:
            return Z
        check_scalar(self.cv_max_samples, "cv_max_samples", numbers.Integral, min_val=2)
        return Z if len(Z) <= self.cv_max_samples else Z[rng.choice(len(Z), self.cv_max_samples, replace=False)]

    def _mixture(self, n_components: int, seed: int) -> GaussianMixture:
        return GaussianMixture(n_components, covariance_type="full", reg_covar=self.reg_covar,
                               max_iter=self.max_iter, n_init=1, random_state=seed)

    def _cv_score(self, Z, folds, n_components: int, seed: int) -> float:
        """Mean over folds of the held-out mean log-likelihood of a ``n_components`` mixture."""
        return float(np.mean([self._mixture(n_components, seed).fit(Z[train]).score(Z[test])
                              for train, test in folds]))


class FlowDetector(BaseDetector):
    """Masked autoregressive flow (zuko MAF, standard normal base) on standardised features (MSMA).

    ``score_samples(X)`` is the flow's log-density of X in input units, shape (n_samples,), higher =
    more in-distribution (standardisation log-Jacobian included, a constant).

    Training: Adam on the mean negative log-likelihood, minibatches of ``batch_size`` rows, float32.
    A random ``validation_fraction`` of the rows is held out (from the training features; no OOD
    data); training stops after ``patience`` epochs without improvement of the held-out loss and the
    best state is kept. With ``validation_fraction=0`` the training loss is monitored instead. Fixed
    ``random_state`` gives identical weights and scores on the same machine and thread count; the
    global torch RNG is left untouched.

    Args:
        hidden_features: hidden layer widths of each MADE network.
        transforms: number of autoregressive transforms.
        max_epochs: most passes over the training rows.
        batch_size: rows per Adam step.
        lr: Adam learning rate.
        validation_fraction: fraction of rows held out for early stopping, in [0, 1).
        patience: epochs without improvement before stopping.
        standardize: standardise each feature before fitting.
        acceptance: target fraction of in-distribution data predicted +1, in (0, 1].
        random_state: seed for the initialisation, the split and the batch order.
        device: torch device used for training.
        verbose: show a tqdm progress bar over epochs.

    Attributes:
        scaler_: fitted StandardScaler, or None.
        flow_: the trained ``zuko.flows.MAF`` (best state), float64, on CPU, in eval mode.
        n_epochs_: epochs run.
        best_epoch_: epoch (1-based) whose state was kept.
        loss_curve_: mean training loss (nats per row) of each epoch.
        validation_loss_curve_: held-out loss of each epoch (empty without a held-out slice).
        offset_: threshold on ``score_samples``.
    """

    def __init__(self, hidden_features=(128, 128), transforms=5, max_epochs=200, batch_size=128, lr=1e-3,
                 validation_fraction=0.1, patience=10, standardize=True, acceptance=0.95, random_state=0,
                 device="cpu", verbose=False):
        self.hidden_features = hidden_features
        self.transforms = transforms
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.standardize = standardize
        self.acceptance = acceptance
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _fit(self, X):
        self._check_params()
        seed = _seed(self.random_state)
        generator = torch.Generator().manual_seed(seed)
        Z = torch.from_numpy(np.array(self._fit_scaler(X), dtype=np.float32))
        train, val = self._split(Z, generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = zuko.flows.MAF(Z.shape[1], transforms=self.transforms,
                                  hidden_features=tuple(self.hidden_features))
        flow = flow.to(self.device)
        best_state = self._train(flow, train.to(self.device), val.to(self.device), generator)
        flow.load_state_dict(best_state)
        self.flow_ = flow.cpu().double().eval()
        return self._score_samples(X)

    def _score_samples(self, X):
        Z = torch.from_numpy(np.array(self._standardize(X), dtype=np.float64))
        with torch.no_grad():
            log_prob = torch.cat([self.flow_().log_prob(z) for z in Z.split(_SCORE_CHUNK)])
        return log_prob.numpy() + self._log_abs_det()

    def _check_params(self) -> None:
        for name in ("transforms", "max_epochs", "batch_size", "patience"):
            check_scalar(getattr(self, name), name, numbers.Integral, min_val=1)
        check_scalar(self.lr, "lr", numbers.Real, min_val=0.0, include_boundaries="neither")
        check_scalar(self.validation_fraction, "validation_fraction", numbers.Real, min_val=0.0, max_val=1.0,
                     include_boundaries="left")

    def _split(self, Z: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (train, held-out) split; the held-out part is empty when validation_fraction is 0."""
        n_val = 0 if self.validation_fraction == 0 else min(max(1, round(self.validation_fraction * len(Z))),
                                                              len(Z) - 1)
        perm = torch.randperm(len(Z), generator=generator)
        return Z[perm[n_val:]], Z[perm[:n_val]]

    def _train(self, flow, train, val, generator) -> dict:
        """Adam with early stopping; fills the curves and epoch counts; returns the best state dict."""
        optimizer = torch.optim.Adam(flow.parameters(), lr=self.lr)
        self.loss_curve_, self.validation_loss_curve_ = [], []
        best_loss, best_state, self.best_epoch_, wait = math.inf, copy.deepcopy(flow.state_dict()), 0, 0
        epochs = range(1, self.max_epochs + 1)
        if self.verbose:
            from dgmood.utils.progress import progress_bar

            epochs = progress_bar(epochs, desc="FlowDetector", unit="epoch")
        for epoch in epochs:
            self.n_epochs_ = epoch
            self.loss_curve_.append(self._epoch(flow, optimizer, train, generator))
            if len(val):
                self.validation_loss_curve_.append(self._mean_nll(flow, val))
            monitored = self.validation_loss_curve_[-1] if len(val) else self.loss_curve_[-1]
            if self.verbose:
                epochs.set_postfix(train=self.loss_curve_[-1], monitored=monitored)
            if monitored < best_loss:
                best_loss, best_state, self.best_epoch_, wait = monitored, copy.deepcopy(flow.state_dict()), epoch, 0
            else:
                wait += 1
            if wait >= self.patience or not math.isfinite(self.loss_curve_[-1]):
                break
        return best_state

    def _epoch(self, flow, optimizer, train, generator) -> float:
        """One shuffled pass of Adam steps; returns the mean training loss."""
        flow.train()
        total = 0.0
        perm = torch.randperm(len(train), generator=generator).to(train.device)
        for idx in perm.split(self.batch_size):
            loss = -flow().log_prob(train[idx]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        return total / len(train)

    @staticmethod
    def _mean_nll(flow, Z) -> float:
        flow.eval()
        with torch.no_grad():
            return float(-torch.cat([flow().log_prob(z) for z in Z.split(_SCORE_CHUNK)]).mean())


class KNNDetector(BaseDetector):
    """Distance to the k-th nearest training point (kd-tree) on standardised features (MSMA's "KD tree").

    ``score_samples(X)`` is minus the Euclidean distance (standardised units) from each row of X to its
    ``n_neighbors``-th nearest training row, shape (n_samples,), higher = more in-distribution. New
    rows are not excluded from anything: a training row passed again matches itself at distance 0. The
    training scores that set ``offset_`` do exclude each row's own match, so the threshold is that of
    unseen in-distribution data.

    Args:
        n_neighbors: k; clipped to n_samples - 1 (with a warning) for tiny training sets.
        standardize: standardise each feature before building the tree.
        acceptance: target fraction of in-distribution data predicted +1, in (0, 1].

    Attributes:
        scaler_: fitted StandardScaler, or None.
        n_neighbors_: the k used.
        neighbors_: fitted ``NearestNeighbors(algorithm="kd_tree")``.
        offset_: threshold on ``score_samples``.
    """

    def __init__(self, n_neighbors=5, standardize=True, acceptance=0.95):
        self.n_neighbors = n_neighbors
        self.standardize = standardize
        self.acceptance = acceptance

    def _fit(self, X):
        check_scalar(self.n_neighbors, "n_neighbors", numbers.Integral, min_val=1)
        Z = self._fit_scaler(X)
        self.n_neighbors_ = min(self.n_neighbors, len(Z) - 1)
        if self.n_neighbors_ < self.n_neighbors:
            warnings.warn(f"n_neighbors ({self.n_neighbors}) >= n_samples ({len(Z)}); "
                          f"using n_neighbors = {self.n_neighbors_}", UserWarning, stacklevel=3)
        self.neighbors_ = NearestNeighbors(n_neighbors=self.n_neighbors_, algorithm="kd_tree").fit(Z)
        distances, _ = self.neighbors_.kneighbors(Z, n_neighbors=self.n_neighbors_ + 1)
        return -distances[:, -1]

    def _score_samples(self, X):
        distances, _ = self.neighbors_.kneighbors(self._standardize(X))
        return -distances[:, -1]


class CombinedDetector(GMMDetector):
    """A Gaussian mixture on standardised statistics plus a distance term (ours; see :mod:`dgmood.methods.combined`).

    The last ``distance_columns`` columns of X are log distances to training data (e.g. to the k-th nearest
    training image in raw pixels); the ``hinge_columns`` before them are one-sided evidence (a statistic that
    only its high values make suspect, e.g. the orientation statistic); the mixture models the other columns.
    With every column standardised (training mean and standard deviation), each term is a deviation in training
    standard deviations, positive = away from the training images:

        u_q = −(log q(z_stats) − m) / s,    u_h = z_h (each hinge column),    u_d = mean(z_distances),

    where q is the mixture density and m, s the mean and standard deviation of log q over the training rows.
    With ``extreme_weight`` > 0 one more one-sided term reads the mixture's columns one at a time (eq. C3):

        u_e = (max_j |z_j| − m_e) / s_e,

    the largest deviation of any one statistic, m_e and s_e its mean and standard deviation over the training rows.
    A mixture over many columns dilutes a large deviation of one of them among the others' ordinary values (on
    CIFAR-10 a pasted 6 × 6 square moves the smallest-σ score norm far beyond its training range yet the mixture's
    density little); u_e does not. It enters like a hinge column: ``− extreme_weight · one_sided(u_e)``.
    With ``term_shape="linear"`` the score of a row is (eq. C1)

        score = −u_q − hinge_weight · Σ max(u_h, 0) − distance_weight · u_d,

    with ``term_shape="softplus"`` every term is one-sided, a smooth hinge log(1 + e^u) (eq. C2)

        score = −softplus(u_q) − hinge_weight · Σ softplus(u_h) − distance_weight · softplus(u_d):

    an image far from the training images in any term loses about as much as under eq. C1, but one unusually
    typical term (a very high density, a very near training image) no longer buys off another term's evidence
    against it. Weight 1 gives every term equal say. Higher = more in-distribution; shape (n_samples,). With
    ``distance_columns=0``, ``hinge_columns=0`` and the linear shape it is the standardised mixture score.

    Args:
        distance_columns: How many trailing columns are log distances (>= 0).
        distance_weight: Weight of the distance term.
        hinge_columns: How many columns before the distances are one-sided terms (>= 0; the distance and hinge
            columns together fewer than n_features).
        hinge_weight: Weight of the one-sided terms.
        term_shape: ``linear`` (eq. C1; what detectors saved before eq. C2 use) or ``softplus`` (eq. C2).
        extreme_weight: Weight of the largest single deviation u_e (eq. C3); 0, what detectors saved before it
            use, leaves it out.
        Other arguments: as :class:`GMMDetector` (``standardize`` is always on).

    Attributes:
        density_mean_, density_std_: m and s above.
        extreme_mean_, extreme_std_: m_e and s_e above (when ``extreme_weight`` > 0).
        Others: as :class:`GMMDetector`.
    """

    def __init__(self, distance_columns=1, distance_weight=1.0, max_components=20, component_grid=None, cv=10,
                 acceptance=0.95, random_state=0, cv_max_samples=10_000, reg_covar=1e-5, max_iter=200,
                 hinge_columns=0, hinge_weight=1.0, term_shape="linear", extreme_weight=0.0):
        super().__init__(max_components=max_components, component_grid=component_grid, cv=cv, standardize=True,
                         acceptance=acceptance, random_state=random_state, cv_max_samples=cv_max_samples,
                         reg_covar=reg_covar, max_iter=max_iter)
        self.distance_columns = distance_columns
        self.distance_weight = distance_weight
        self.hinge_columns = hinge_columns
        self.hinge_weight = hinge_weight
        self.term_shape = term_shape
        self.extreme_weight = extreme_weight

    def _fit(self, X):
        check_scalar(self.distance_columns, "distance_columns", numbers.Integral, min_val=0)
        check_scalar(self.hinge_columns, "hinge_columns", numbers.Integral, min_val=0)
        if self.distance_columns + self.hinge_columns >= X.shape[1]:
            raise ValueError(f"distance_columns={self.distance_columns} and hinge_columns={self.hinge_columns} leave "
                             f"the mixture no statistic: X has {X.shape[1]} feature(s); pass at least one statistic "
                             "column before them")
        check_scalar(self.distance_weight, "distance_weight", numbers.Real, min_val=0.0)
        check_scalar(self.hinge_weight, "hinge_weight", numbers.Real, min_val=0.0)
        check_scalar(self.extreme_weight, "extreme_weight", numbers.Real, min_val=0.0)
        if self.term_shape not in TERM_SHAPES:
            raise ValueError(f"term_shape must be one of {', '.join(TERM_SHAPES)}, got {self.term_shape!r}")
        self.standardize = True
        Z = self._fit_scaler(X)
        density = self._fit_mixture(Z[:, : self.mixture_columns])
        self.density_mean_, self.density_std_ = float(density.mean()), float(density.std()) or 1.0
        if self.extreme_weight:
            extreme = largest_deviation(Z[:, : self.mixture_columns])
            self.extreme_mean_, self.extreme_std_ = float(extreme.mean()), float(extreme.std()) or 1.0
        return self._combine(density, Z)

    def _score_samples(self, X):
        Z = self._standardize(X)
        return self._combine(self.gmm_.score_samples(Z[:, : self.mixture_columns]), Z)

    @property
    def mixture_columns(self) -> int:
        """How many leading columns of X the mixture models: those before the hinge and distance columns."""
        return self.n_features_in_ - self.distance_columns - self.hinge_columns

    def _combine(self, density: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Eq. C1 or C2 (and C3) from the mixture's log-density (N,) and the standardised rows Z (N, n_features)."""
        two_sided, one_sided = TERM_SHAPES[self.term_shape]
        score = -two_sided((self.density_mean_ - density) / self.density_std_)
        if self.extreme_weight:
            extreme = largest_deviation(Z[:, : self.mixture_columns])
            score = score - self.extreme_weight * one_sided((extreme - self.extreme_mean_) / self.extreme_std_)
        if self.hinge_columns:
            hinge = Z[:, self.mixture_columns:self.mixture_columns + self.hinge_columns]
            score = score - self.hinge_weight * one_sided(hinge).sum(axis=1)
        if self.distance_columns:
            distance = Z[:, self.n_features_in_ - self.distance_columns:].mean(axis=1)
            score = score - self.distance_weight * two_sided(distance)
        return score


def largest_deviation(Z: np.ndarray) -> np.ndarray:
    """Eq. C3's max_j |z_j|: each row's largest absolute deviation (N,), of standardised columns Z (N, F) in
    training standard deviations."""
    return np.abs(Z).max(axis=1)


def softplus(u: np.ndarray) -> np.ndarray:
    """Eq. C2's term for deviations u (training standard deviations): log(1 + e^u), a smooth hinge (≈ 0 below the
    training mean, ≈ u far above it)."""
    return np.logaddexp(0.0, u)


TERM_SHAPES = {"linear": (lambda u: u, lambda u: np.maximum(u, 0.0)), "softplus": (softplus, softplus)}
""":class:`CombinedDetector`'s ``term_shape`` → (term of the density and distance, term of a hinge column): eq. C1
keeps the first linear and hinges the second at 0; eq. C2 makes both softplus."""


DETECTORS = {"gmm": GMMDetector, "flow": FlowDetector, "knn": KNNDetector}
"""Detector names used on the command line → classes."""
