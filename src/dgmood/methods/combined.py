"""The combined detector (ours): every cheap per-image statistic of one score model, one density model on them.

MSMA's score norms, the input complexity, the FLIPD local intrinsic dimension, the diffusion reconstruction
error, the feature k-NN distance (to the nearest training images in the network's middle-block activations) and
the orientation statistic (how much nearer the training images a flip or rotation of the image is, eq. O1)
are concatenated per image, put on a log scale where they are positive norms or errors, standardised with
training statistics and modelled by one Gaussian mixture fitted on training images only. The k-NN term, the
log distance to the k-th nearest training image in raw pixels, and the orientation statistic are added to the
mixture's log-density as terms; every term, the density's too, is one-sided (a smooth hinge of its deviation in
training standard deviations, eq. C2: only deviations away from the training images count against an image;
:class:`~dgmood.detectors.estimators.CombinedDetector`). No OOD data is used at any step: FLIPD's σ₀ comes from
the LPCA calibration on training images, the mixture's size from held-out training likelihood, every term's weight
is 1 (equal say, not tuned).

Why these statistics (measured, docs/results.md): each sees a different kind of shift. Score norms see
density at many scales; complexity sees how much is in the image; the LID sees the local dimension of the
model's manifold; reconstruction sees whether denoising returns the image; the feature k-NN sees whether the coarse
layout of what the network recognises matches a training image (a flipped or rotated one does not); orientation sees
whether the image is the way up the training images are; raw-pixel
distance sees novelty that the model smooths over. The mixture learns how they co-vary on training images, so an image whose
statistics break that relation (e.g. low complexity with the score norm of a complex image) scores low
even when each statistic alone looks normal.

The detector itself is the ``combined`` recipe of :mod:`dgmood.methods.recipes`; this module evaluates it on a run
(with the MSMA k-NN and the raw-pixel k-NN beside it when asked) and writes its report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dgmood.methods.recipes import DEFAULT_COMBINED_FEATURES, MethodConfig
from dgmood.statistics.base import as_columns

__all__ = ["FEATURES", "CombinedConfig", "CombinedEvaluation", "evaluate_combined", "to_columns",
           "write_combined_outputs"]

FEATURES = DEFAULT_COMBINED_FEATURES
"""The combined detector's default statistics, in column order (:data:`~dgmood.methods.recipes.COMBINED_FEATURES`
lists every one it can use)."""

CombinedConfig = MethodConfig
"""Settings of the combined detector (the recipes' :class:`~dgmood.methods.recipes.MethodConfig`)."""

_LOG_SCALE = {"msma", "reconstruction", "knn"}


def to_columns(name: str, values: np.ndarray) -> np.ndarray:
    """One statistic as feature columns, shape (N, K): log of positive norms / errors / distances, else as is."""
    return as_columns(values, name in _LOG_SCALE)


@dataclass
class CombinedEvaluation:
    """What :func:`evaluate_combined` returns.

    Attributes:
        results: method → OOD name → metric → value (``combined`` first, then the baselines asked for).
        scores: method → {"in": (N,), "ood": {name: (M,)}}, higher = more in-distribution.
        detector: The fitted :class:`~dgmood.detectors.estimators.CombinedDetector`.
        image_detector: The fitted :class:`~dgmood.methods.image_detector.ImageDetector` around it.
        seconds_per_image: Statistic → seconds per image when it was computed.
        directory: Where metrics, plots and report go (``RUN/combined``).
        evaluation: The underlying :class:`~dgmood.evaluation.evaluate.Evaluation`.
    """

    results: dict
    scores: dict
    detector: object
    image_detector: object
    seconds_per_image: dict
    directory: Path
    evaluation: object


def evaluate_combined(run, config: MethodConfig | None = None, ood_specs: list[str] = (), in_spec: str = "",
                      extra_sets: dict[str, Callable[[], np.ndarray]] | None = None,
                      baselines: tuple[str, ...] = ()) -> CombinedEvaluation:
    """Fit (or load) the combined detector of a run and score its test sets.

    Args:
        run: A :class:`~dgmood.app.runs.Run` holding a trained score model.
        config: Which statistics, and their settings (default: the run's σ grid, every statistic).
        ood_specs: OOD dataset specs.
        in_spec: In-distribution test spec (default: the run's).
        extra_sets: More OOD sets as name → image loader (e.g. transformed test images); the name is the cache key.
        baselines: Other methods scored beside it (e.g. ``msma-knn``, ``pixel-knn``).
    """
    if run.config.model != "score":
        raise ValueError(f"{run.directory} holds a {run.config.model} model; the combined detector needs a "
                         "score model (`dgmood train --model score`)")
    config = config or run.method_config()
    ev, detectors = run.evaluate_methods(["combined", *baselines], list(ood_specs), in_spec, extra_sets, config)
    det = detectors["combined"]
    return CombinedEvaluation(ev.results, ev.scores, det.estimator, det, dict(run.cache.seconds),
                              run.directory / "combined", ev)


def write_combined_outputs(run, config: MethodConfig, ev: CombinedEvaluation, in_spec: str, seconds: float) -> str:
    """metrics.json/.csv, ROC and score histograms, report.md and report.html in ``ev.directory``; returns the
    text table."""
    from dgmood.evaluation.evaluate import write_evaluation
    from dgmood.methods.explain import galleries

    det = ev.detector
    context = {
        "training set": run.config.data,
        "in-distribution test set": in_spec,
        "statistics": ", ".join(config.features),
        "mixture fitted on": f"{run.fit_spec()} ({det.n_components_} components, {det.n_features_in_} features)",
        "model sha256": run.model_sha[:16],
        "threshold": f"{det.offset_:.4g} (training acceptance {config.acceptance:.0%})",
        "saved detector": str(run.detector_dir("combined")),
    }
    for stat, s in ev.seconds_per_image.items():
        context[f"time per image: {stat}"] = f"{s * 1000:.2f} ms"
    context["evaluation time"] = f"{seconds:.1f} s"
    return write_evaluation(ev.directory, ev.evaluation, context, "dgmood combined-detector report", "combined",
                            {"config": config.to_dict(), "seconds_per_image": ev.seconds_per_image},
                            galleries(ev.image_detector, ev.evaluation, "combined"))
