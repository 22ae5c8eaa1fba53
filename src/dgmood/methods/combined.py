"""The combined detector (ours): every cheap per-image statistic of one score model, one density model on them.

MSMA's score norms, the input complexity, the FLIPD local intrinsic dimension and the diffusion reconstruction
error are concatenated per image, put on a log scale where they are positive norms or errors, standardised with
training statistics and modelled by one Gaussian mixture fitted on training images only. The optional k-NN term,
the log distance to the k-th nearest training image in raw pixels, is added to the mixture's log-density, both
in training standard deviations (:class:`~dgmood.detectors.estimators.CombinedDetector`). No OOD data is used at any
step: FLIPD's σ₀ comes from the LPCA calibration of the dual-threshold method (training data), the mixture's
size from held-out training likelihood, the k-NN term's weight is 1 (equal say, not tuned).

Why these statistics (measured, docs/results.md): each sees a different kind of shift. Score norms see
density at many scales; complexity sees how much is in the image; the LID sees the local dimension of the
model's manifold; reconstruction sees whether denoising returns the image; raw-pixel distance sees novelty
that the model smooths over. The mixture learns how they co-vary on training images, so an image whose
statistics break that relation (e.g. low complexity with the score norm of a complex image) scores low
even when each statistic alone looks normal.

Every statistic is cached (MSMA features in ``RUN/features``, the others in ``RUN/lens``); the fitted mixture is
saved in ``RUN/combined/detector``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dgmood.statistics.lens import LensConfig, StatCache

__all__ = ["FEATURES", "CombinedConfig", "CombinedEvaluation", "CombinedFeatures", "evaluate_combined",
           "fitted_detector", "knn_distance", "to_columns", "write_combined_outputs"]

FEATURES = ("msma", "complexity", "flipd", "reconstruction", "knn")
"""Statistics the combined detector can use, in column order."""

_LOG_SCALE = {"msma", "reconstruction", "knn"}
"""Positive norms, errors and distances: modelled on a log scale."""


@dataclass(frozen=True)
class CombinedConfig:
    """Settings of the combined detector.

    Attributes:
        features: Statistics to concatenate, a subset of :data:`FEATURES`.
        lens: Probes and seed of FLIPD; its σ₀ is the dual-threshold calibration of this lens.
        reconstruction_sigmas: Noise levels (pixel scale) of the reconstruction error.
        reconstruction_steps: Probability-flow Euler steps per level.
        knn_k: k of the raw-pixel k-NN distance (to the k-th nearest training image).
        knn_weight: Weight of the k-NN term against the mixture's standardised log-density.
        max_components: Largest number of mixture components tried (2, 4, ..., chosen by held-out likelihood).
        acceptance: In-distribution training acceptance of the fitted threshold.
    """

    features: tuple[str, ...] = FEATURES
    lens: LensConfig = field(default_factory=lambda: LensConfig(lens="diffusion", lid="flipd"))
    reconstruction_sigmas: tuple[float, ...] = (0.1, 0.3)
    reconstruction_steps: int = 5
    knn_k: int = 5
    knn_weight: float = 1.0
    max_components: int = 10
    acceptance: float = 0.95

    def __post_init__(self):
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"unknown combined feature(s) {unknown or '(none given)'}; choose from "
                             f"{', '.join(FEATURES)}")
        object.__setattr__(self, "features", tuple(f for f in FEATURES if f in self.features))  # k-NN column last
        if self.lens.lens != "diffusion":
            raise ValueError("the combined detector works on a score model (diffusion lens)")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def to_columns(name: str, values: np.ndarray) -> np.ndarray:
    """One statistic as feature columns, shape (N, K): log of positive norms / errors / distances, else as is."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return np.log(np.maximum(values, 1e-12)) if name in _LOG_SCALE else values


def knn_distance(bank: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance in raw pixels from each query to its k-th nearest image of ``bank``, shape (N,).

    Args:
        bank: Reference images (M, C, H, W), pixel scale.
        queries: Images (N, C, H, W) of the same shape.
        k: Which neighbour.
        exclude_self: The queries are rows of ``bank``: skip the zero distance to themselves (leave-one-out).
    """
    from sklearn.neighbors import NearestNeighbors

    kk = k + int(exclude_self)
    if len(bank) < kk:
        raise ValueError(f"the k-NN term needs at least {kk} training images, got {len(bank)}")
    nn = NearestNeighbors(n_neighbors=kk, algorithm="brute").fit(bank.reshape(len(bank), -1))
    return nn.kneighbors(queries.reshape(len(queries), -1))[0][:, -1]


class CombinedFeatures:
    """The combined detector's statistics of datasets under one run's score model, each computed once."""

    def __init__(self, run, config: CombinedConfig):
        if run.config.model != "score":
            raise ValueError(f"{run.directory} holds a {run.config.model} model; the combined detector needs a "
                             "score model (`dgmood train --model score`)")
        self.run, self.config = run, config
        self.cache = StatCache(run.directory / "lens", run.model_sha)
        self.seconds: dict[str, float] = {}
        self._train: np.ndarray | None = None
        self._sigma0: float | None = None

    @property
    def fit_spec(self) -> str:
        """The training images the mixture is fitted on (the run's MSMA fit set)."""
        return self.run.fit_spec()

    @property
    def train(self) -> np.ndarray:
        if self._train is None:
            self._train = self.run.images(self.run.config.data)
        return self._train

    def sigma0(self) -> float:
        """FLIPD's σ₀ from the dual-threshold LPCA calibration (stored in the run, computed when missing)."""
        if self._sigma0 is None:
            from dgmood.methods.dual_threshold import DualConfig, calibration

            self._sigma0 = float(calibration(self.run, DualConfig(lens=self.config.lens))["value"])
        return self._sigma0

    def matrix(self, spec: str, images_fn: Callable[[], np.ndarray] | None = None) -> np.ndarray:
        """Feature matrix of a dataset, shape (N, F): the statistics of ``config.features`` side by side.

        Args:
            spec: Dataset spec (or any unique name when ``images_fn`` is given): the cache key.
            images_fn: Returns the images (N, C, H, W) when a statistic must be computed; default loads ``spec``.
        """
        images_fn = images_fn or (lambda: self.run.images(spec))
        loaded = _Once(images_fn)
        return np.concatenate([to_columns(name, self._statistic(name, spec, loaded)) for name in self.config.features],
                              axis=1)

    def _statistic(self, name: str, spec: str, images: "_Once") -> np.ndarray:
        if name == "msma":
            return self._msma(spec, images)
        if name == "knn":
            return self._knn(spec, images)
        extra = {"sigma0": self.sigma0()} if name == "flipd" else {}
        if name == "reconstruction":
            extra = {"sigmas": list(self.config.reconstruction_sigmas), "steps": self.config.reconstruction_steps}
        values, meta = self.cache.get(name, self.config.lens, spec, images, self.run.model, self.run.device,
                                      self.run.progress, **extra)
        self.seconds.setdefault(name, meta.get("seconds_per_image", float("nan")))
        return values

    def _msma(self, spec: str, images: "_Once") -> np.ndarray:
        """Score norms on the run's σ grid, shared with the run's MSMA detectors (one cache)."""
        from dgmood.statistics.score_norms import FeatureCache

        cache = FeatureCache(self.run.directory / "features", self.run.model_sha)
        cfg = self.run.config.features
        features = cache.get(spec, cfg.sigmas(), images, self.run.model, self.run.device, cfg.batch_size,
                             self.run.progress)
        if "images_per_s" in features.meta:
            self.seconds.setdefault("msma", 1.0 / features.meta["images_per_s"])
        return features.values

    def _knn(self, spec: str, images: "_Once") -> np.ndarray:
        settings = {"k": self.config.knn_k, "bank": self.run.config.data, "leave_one_out": spec == self.fit_spec}
        hit = self.cache.load("knn", settings, spec)
        if hit is not None:
            self.seconds.setdefault("knn", hit[1].get("seconds_per_image", float("nan")))
            return hit[0]
        start = time.perf_counter()  # the fit set's images are rows of the training set: leave each one out
        values = knn_distance(self.train, images(), self.config.knn_k, exclude_self=spec == self.fit_spec)
        seconds = (time.perf_counter() - start) / max(1, len(values))
        self.seconds.setdefault("knn", seconds)
        self.cache.save("knn", settings, spec, values, seconds_per_image=seconds, n=len(values))
        return values


class _Once:
    """A zero-argument image loader that loads at most once (several statistics may need the images)."""

    def __init__(self, fn: Callable[[], np.ndarray] | None):
        self.fn, self._value = fn, None

    def __call__(self) -> np.ndarray:
        if self._value is None:
            self._value = self.fn()
        return self._value


# --- fit, score, report --------------------------------------------------------------------------------------


@dataclass
class CombinedEvaluation:
    """What :func:`evaluate_combined` returns.

    Attributes:
        results: ``{"combined": {OOD name: {metric: value}}}``.
        scores: ``{"combined": {"in": (N,), "ood": {name: (M,)}}}``, higher = more in-distribution.
        detector: The fitted :class:`~dgmood.detectors.estimators.CombinedDetector`.
        seconds_per_image: Statistic → seconds per image when it was computed.
        directory: Where metrics, plots and report go (``RUN/combined``).
    """

    results: dict
    scores: dict
    detector: object
    seconds_per_image: dict
    directory: Path


def _detector_meta(feats: CombinedFeatures) -> dict:
    return {"model_sha256": feats.run.model_sha, "fit_data": feats.fit_spec, "combined": feats.config.to_dict()}


def fitted_detector(feats: CombinedFeatures):
    """The run's combined mixture, loaded from ``RUN/combined/detector``; fitted (and saved) when missing or stale."""
    from dgmood.detectors.estimators import CombinedDetector
    from dgmood.detectors.persist import load_detector, save_detector

    folder, expected = feats.run.directory / "combined" / "detector", _detector_meta(feats)
    if (folder / "detector.json").is_file():
        try:
            det, meta = load_detector(folder)
        except (ValueError, OSError, KeyError):
            det, meta = None, {}
        if det is not None and {k: meta.get(k) for k in expected} == json.loads(json.dumps(expected)):
            return det
    start = time.perf_counter()
    train = feats.matrix(feats.fit_spec)
    cfg = feats.config
    det = CombinedDetector(distance_columns=int("knn" in cfg.features), distance_weight=cfg.knn_weight,
                           max_components=cfg.max_components, acceptance=cfg.acceptance).fit(train)
    save_detector(det, folder, dict(expected, fit_seconds=time.perf_counter() - start, n_train=len(train)))
    return det


def evaluate_combined(run, config: CombinedConfig, ood_specs: list[str], in_spec: str = "",
                      extra_sets: dict[str, Callable[[], np.ndarray]] | None = None) -> CombinedEvaluation:
    """Fit (or load) the combined detector on training features and score the test sets.

    Args:
        run: A :class:`~dgmood.app.runs.Run` holding a trained score model.
        config: Which statistics, and their settings.
        ood_specs: OOD dataset specs.
        in_spec: In-distribution test spec (default: the run's).
        extra_sets: More OOD sets as name → image loader (e.g. transformed test images); the name is the cache key.
    """
    from dgmood.evaluation.metrics import evaluate

    in_spec = in_spec or run.config.in_test
    if not in_spec:
        raise ValueError("no in-distribution test set known for this run; name one with --in SPEC")
    if not ood_specs and not extra_sets:
        raise ValueError("no OOD set given; name at least one with --ood SPEC")
    feats = CombinedFeatures(run, config)
    detector = fitted_detector(feats)
    loaders = {spec: None for spec in ood_specs} | dict(extra_sets or {})
    score_in = detector.score_samples(feats.matrix(in_spec))
    scores = {"combined": {"in": score_in,
                           "ood": {name: detector.score_samples(feats.matrix(name, fn)) for name, fn in loaders.items()}}}
    results = {"combined": {name: evaluate(score_in, s) for name, s in scores["combined"]["ood"].items()}}
    return CombinedEvaluation(results, scores, detector, dict(feats.seconds), run.directory / "combined")


def write_combined_outputs(run, config: CombinedConfig, ev: CombinedEvaluation, in_spec: str, seconds: float) -> str:
    """metrics.json/.csv, ROC and score histograms, report.md in ``ev.directory``; returns the text table."""
    from dgmood.evaluation import report
    from dgmood.utils.files import write_json

    out = ev.directory
    rows = report.metrics_table(ev.results)
    report.write_metrics(out, ev.results)
    write_json(out / "evaluation.json", {"in": in_spec, "ood": list(ev.scores["combined"]["ood"]),
                                          "config": config.to_dict(), "seconds_per_image": ev.seconds_per_image})
    entry = ev.scores["combined"]
    plots = {
        "ROC of the combined detector": report.plot_roc(ev.scores, out / "plots" / "roc.png"),
        "Combined score, in-distribution vs each OOD set": report.plot_score_histograms(
            entry["in"], entry["ood"], out / "plots" / "scores.png", label="combined score (training std units)"),
    }
    det = ev.detector
    context = {
        "training set": run.config.data,
        "in-distribution test set": in_spec,
        "statistics": ", ".join(config.features),
        "mixture fitted on": f"{run.fit_spec()} ({det.n_components_} components, {det.n_features_in_} features)",
        "model sha256": run.model_sha[:16],
        "threshold": f"{det.offset_:.4g} (training acceptance {config.acceptance:.0%})",
    }
    for stat, s in ev.seconds_per_image.items():
        context[f"time per image: {stat}"] = f"{s * 1000:.2f} ms"
    context["evaluation time"] = f"{seconds:.1f} s"
    report.write_report(out, rows, plots, context, title="dgmood combined-detector report")
    return report.format_table(rows, "text")
