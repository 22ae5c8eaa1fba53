"""The contract of a per-image statistic: a scikit-learn-style transformer from images to feature columns.

A statistic turns images (N, C, H, W) on the [0, 1] pixel scale into raw values of shape (N,) or (N, K) under
a trained generative model. Some learn something from training images first (``fit``): FLIPD's σ₀ from the
LPCA calibration, the raw-pixel k-NN's bank of training images. Parameters are constructor keywords
(``get_params``, as in scikit-learn); fitted attributes end in ``_`` and travel through ``state`` /
``set_state`` (JSON scalars + arrays, never pickles). Values are cached by whoever computes them, keyed by
``name`` and ``cache_settings()`` beside the model and the dataset (see :mod:`dgmood.statistics.cache`).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np

__all__ = ["STATISTICS", "Statistic", "array_digest", "as_columns", "register", "statistic_from_dict"]

STATISTICS: dict[str, type["Statistic"]] = {}
"""Class name → class of every statistic, for loading saved detectors."""


def register(cls: type["Statistic"]) -> type["Statistic"]:
    """Class decorator: make a statistic loadable by its class name."""
    STATISTICS[cls.__name__] = cls
    return cls


def array_digest(*arrays) -> str:
    """Short SHA-256 of fitted arrays: part of a cache key (other fitted values, other statistic values)."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def as_columns(values: np.ndarray, log_scale: bool) -> np.ndarray:
    """Raw statistic values (N,) or (N, K) as float64 columns (N, K); natural log of positive ones when
    ``log_scale`` (norms, errors and distances are modelled on a log scale), floored at 1e-12."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return np.log(np.maximum(values, 1e-12)) if log_scale else values


class Statistic:
    """Base class; subclasses set ``name``, implement ``compute`` and, when they learn from training images, ``fit``.

    Class attributes:
        name: Short name, the cache folder and the prefix of the column names.
        log_scale: Whether detectors should see log values (positive norms, errors, distances).
        fitted: Names of fitted attributes saved by :meth:`state`.
        forward_only: The statistic needs the network's forward passes only (no gradients), so it may be given
            the exported network (:class:`~dgmood.models.exported.OnnxScoreNet`) instead of the module.
        shared_sigmas: Noise levels of clean-image passes it reads that another statistic may run too (the feature
            k-NN's σ, a level of the score norms): a detector computes those passes once per chunk of images
            (:class:`~dgmood.models.shared_passes.SharedPasses`).
    """

    name: ClassVar[str] = ""
    log_scale: ClassVar[bool] = False
    fitted: ClassVar[tuple[str, ...]] = ()
    forward_only: ClassVar[bool] = False
    shared_sigmas: tuple[float, ...] = ()

    def get_params(self) -> dict:
        """Constructor parameters and their values (JSON types)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: _plain(getattr(self, n)) for n in names}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def fit(self, model, images: np.ndarray, device="cpu", progress: bool = False) -> "Statistic":
        """Learn what the statistic needs from training images (N, C, H, W); nothing by default."""
        return self

    def compute(self, model, images: np.ndarray, device="cpu", progress: bool = False) -> np.ndarray:
        """Raw values of shape (N,) or (N, K), float64."""
        raise NotImplementedError

    def compute_training(self, model, images: np.ndarray, device="cpu", progress: bool = False) -> np.ndarray:
        """Values of training images that the statistic was fitted on (the k-NN leaves each one out)."""
        return self.compute(model, images, device, progress)

    def cache_settings(self, training: bool = False) -> dict:
        """What the values depend on beside model and images: the parameters and fitted values that change
        them. ``training``: the key of :meth:`compute_training` (the same unless that differs)."""
        return self.get_params()

    def columns(self, n_columns: int) -> list[str]:
        """Names of the ``n_columns`` feature columns, e.g. ``flipd`` or ``reconstruction@sigma=0.1``."""
        return [self.name] if n_columns == 1 else [f"{self.name}[{i}]" for i in range(n_columns)]

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Fitted attributes as (JSON scalars, arrays)."""
        scalars, arrays = {}, {}
        for key in self.fitted:
            value = getattr(self, key)
            if isinstance(value, np.ndarray):
                arrays[key] = value
            else:
                scalars[key] = _plain(value)
        return scalars, arrays

    def set_state(self, scalars: dict, arrays: dict[str, np.ndarray]) -> "Statistic":
        """Restore what :meth:`state` returned; ValueError when something is missing."""
        missing = [k for k in self.fitted if k not in scalars and k not in arrays]
        if missing:
            raise ValueError(f"statistic {self.name} lacks its fitted value(s) {missing}")
        for key in self.fitted:
            setattr(self, key, arrays[key] if key in arrays else scalars[key])
        return self

    def is_fitted(self) -> bool:
        return all(getattr(self, k, None) is not None for k in self.fitted)

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, "params": self.get_params()}


def statistic_from_dict(d: dict) -> Statistic:
    """A statistic from :meth:`Statistic.to_dict` (unfitted); ValueError for an unknown class."""
    from dgmood.statistics import (complexity, feature_knn, field, flipd, knn, likelihood,  # noqa: F401 (register)
                                   local, orientation, reconstruction, score_norms)

    cls = STATISTICS.get(d.get("class"))
    if cls is None:
        raise ValueError(f"unknown statistic {d.get('class')!r}; known: {', '.join(sorted(STATISTICS))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("params", {}).items()})


def _plain(value):
    """JSON types for parameters: tuples as lists, numpy scalars as Python numbers."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
