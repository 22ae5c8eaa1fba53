"""Every detection method as a short recipe over :class:`~dgmood.methods.image_detector.ImageDetector`, in one place.

A recipe names the statistics and the array detector; nothing else differs between methods. The default is
``combined``, the best detector we measured (docs/results.md).

| method | model | statistics | array detector |
|---|---|---|---|
| ``combined`` | score | score norms, complexity, FLIPD, reconstruction, feature k-NN, raw-pixel 5-NN | mixture + k-NN term |
| ``msma-knn``, ``msma-gmm``, ``msma-flow`` | score | score norms (MSMA) | k-NN / GMM / MAF flow |
| ``pixel-knn`` | any | raw-pixel 5-NN distance (baseline) | the distance itself |
| ``dual-threshold`` | flow or score | log-likelihood, LID (Jacobian or FLIPD) | both above thresholds |
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from dgmood.methods.image_detector import ImageDetector

__all__ = ["ALIASES", "COMBINED_FEATURES", "DEFAULT_METHOD", "FEATURE_SIGMA", "METHODS", "MethodConfig", "Recipe",
           "build_detector", "explainer_for", "feature_sigma", "method_names", "resolve_method"]

COMBINED_FEATURES = ("msma", "complexity", "flipd", "reconstruction", "field", "pixels", "local", "fknn", "orient",
                     "knn")
"""Statistics the combined detector can use, in column order (the orientation statistic, a one-sided term, next to
last; the k-NN distance last: :class:`~dgmood.detectors.estimators.CombinedDetector` reads them by position)."""

DEFAULT_COMBINED_FEATURES = ("msma", "complexity", "flipd", "reconstruction", "fknn", "orient", "knn")
"""The combined detector's statistics unless told otherwise."""

DEFAULT_METHOD = "combined"

MAP_SIGMA_MIN = 0.1
"""Smallest σ of the anomaly map's score field (below it pixel noise dominates; docs/results.md)."""


def _msma_grid() -> tuple[float, ...]:
    from dgmood.models.noise import geometric_sigmas

    return tuple(float(s) for s in geometric_sigmas(1.0, 0.01, 10))


@dataclass(frozen=True)
class MethodConfig:
    """Settings the recipes read.

    Attributes:
        sigmas: σ grid of the score norms, pixel scale.
        batch_size: Images per network call of the score norms.
        features: Statistics of the combined detector, a subset of :data:`COMBINED_FEATURES`.
        knn_k: k of the raw-pixel k-NN distance.
        knn_weight: Weight of the k-NN term against the mixture (training standard deviations).
        knn_local: Neighbours K of the local residual (eqs. L2–L3: the patch of the image that none of its K nearest
            training images explains); the combined detector's raw-pixel term averages it with the k-NN distance
            (both standardised). It raised the small-defect checks of three models by up to 0.06 (6 × 6 holes and
            pasted patches +0.02 to +0.05) and lowered no global check of the 28 × 28 models by more than 0.005, for
            ~1 s per 10,000 CIFAR-10 images in `predict`
            (docs/results.md). 0 leaves it out (what detectors saved before it use). As a term of its own it found
            more defects but lowered blurred and low-contrast images' AUROC by 0.02–0.03.
        combined_sigma_stride: The combined detector's score norms use every n-th σ of ``sigmas`` (2: five of
            MSMA's ten levels; measured equal on the shift checks and half the cost, docs/results.md).
        reconstruction_sigmas, reconstruction_steps: The reconstruction error's noise levels and Euler steps
            (1: one Tweedie step x̃ + σ² s(x̃, σ); measured within 0.005 AUROC of 5 steps at a fifth of the cost).
        combined_probes: Hutchinson probes of the combined detector's FLIPD (1 measured as good as 4).
        flipd_difference: Its trace by central differences of this step (× σ₀), forward passes only: 2.9× faster
            than the autograd trace at LIDs within 0.03 of it (docs/results.md); None: autograd.
        feature_knn_sigma: Noise level of the network features of the feature k-NN (``fknn``); None: the level of
            the combined detector's score norms nearest :data:`FEATURE_SIGMA` (0.129 on MSMA's grid), so that the
            two read one network pass per image (measured as good as 0.1 on every shift, docs/results.md).
        complexity_codecs: Codecs of the combined detector's input complexity (PNG alone: on FashionMNIST and
            MNIST PNG is smaller than JPEG2000 on every image, so the values and AUROCs are the same, at about a
            third of the time; docs/results.md).
        feature_knn_k, feature_knn_bank: Its neighbour and how many training images (the first) its bank holds.
        orientation_grid, orientation_bank: The orientation statistic's (``orient``) pooled grid per side and
            how many training images (the first) its bank holds (7 and 5,000; grid 14 finds flips better but costs
            on the occlusion and contrast checks, a 20,000-image bank on blur, docs/results.md).
        orientation_term: How the orientation statistic enters the combined detector: ``hinge`` (a one-sided
            term, eq. C1: only an image that a flip or rotation brings nearer the training images is penalised;
            on both models every flip and rotation check but two rose, by up to 0.05, docs/results.md) or
            ``mixture`` (one more column the mixture models).
        term_shape: How the combined detector's terms (mixture density, one-sided terms, k-NN distance) add up:
            ``softplus`` (eq. C2: each a smooth hinge, so only deviations away from the training images count;
            the MNIST model's vertical flip 0.946 → 0.960, contrast +0.016, FashionMNIST occlusion −0.009;
            docs/results.md) or ``linear`` (eq. C1, the form before).
        max_components: Largest mixture of the combined detector (2, 4, ... by held-out likelihood).
        extreme_weight: Weight of the combined detector's largest-single-deviation term (eq. C3: the one statistic
            furthest from its training range, which the mixture dilutes among the others); 0, the default, leaves it
            out. At weight 1 it raised the CIFAR-10 model's in-distribution-made checks (mean +0.033, test acceptance
            92.3 → 95.0 %) and lowered the FashionMNIST model's (mean −0.023, vertical flip −0.021), so it is not a
            default (docs/results.md).
        mirror: Left-right mirrors are no shift: the model was trained on randomly mirrored images
            (``TrainConfig.hflip``), and the orientation statistic compares images with the training images and
            their mirrors (eq. O2), so a mirrored image scores as the original.
        probes, seed: Hutchinson probes and seed of FLIPD and the PF-ODE likelihood.
        solver: PF-ODE solver of the diffusion likelihood (dual threshold on a score model).
        acceptance: In-distribution training acceptance of every threshold.
    """

    sigmas: tuple[float, ...] = field(default_factory=lambda: _msma_grid())
    batch_size: int = 256
    features: tuple[str, ...] = DEFAULT_COMBINED_FEATURES
    knn_k: int = 5
    knn_weight: float = 1.0
    knn_local: int = 10
    reconstruction_sigmas: tuple[float, ...] = (0.1, 0.3)
    combined_sigma_stride: int = 2
    reconstruction_steps: int = 1
    combined_probes: int = 1
    flipd_difference: float | None = 0.01
    feature_knn_sigma: float | None = None
    complexity_codecs: tuple[str, ...] = ("png",)
    feature_knn_k: int = 5
    feature_knn_bank: int = 20000
    orientation_grid: int = 7
    orientation_bank: int = 5000
    orientation_term: str = "hinge"
    term_shape: str = "softplus"
    max_components: int = 10
    extreme_weight: float = 0.0
    mirror: bool = False
    probes: int = 4
    seed: int = 0
    solver: str = "adaptive"
    acceptance: float = 0.95

    def __post_init__(self):
        unknown = [f for f in self.features if f not in COMBINED_FEATURES]
        if unknown or not self.features:
            raise ValueError(f"unknown combined feature(s) {unknown or '(none given)'}; choose from "
                             f"{', '.join(COMBINED_FEATURES)}")
        object.__setattr__(self, "features", tuple(f for f in COMBINED_FEATURES if f in self.features))
        if self.combined_sigma_stride < 1 or self.combined_probes < 1 or self.reconstruction_steps < 1:
            raise ValueError("combined_sigma_stride, combined_probes and reconstruction_steps must be >= 1")
        if self.flipd_difference is not None and not 0 < self.flipd_difference < 1:
            raise ValueError(f"flipd_difference must lie in (0, 1) (a step relative to σ₀) or be None, got "
                             f"{self.flipd_difference}")
        if self.feature_knn_sigma is not None and not self.feature_knn_sigma > 0:
            raise ValueError(f"feature_knn_sigma must be > 0 (pixel scale) or None, got {self.feature_knn_sigma}")
        if self.orientation_grid < 1 or self.orientation_bank <= self.knn_k:
            raise ValueError(f"orientation_grid must be >= 1 and orientation_bank > knn_k, got {self.orientation_grid} "
                             f"and {self.orientation_bank}")
        if self.orientation_term not in ("mixture", "hinge"):
            raise ValueError(f"orientation_term must be 'mixture' or 'hinge', got {self.orientation_term!r}")
        if not self.extreme_weight >= 0:
            raise ValueError(f"extreme_weight must be >= 0, got {self.extreme_weight}")
        if self.term_shape not in ("linear", "softplus"):
            raise ValueError(f"term_shape must be 'linear' or 'softplus', got {self.term_shape!r}")
        if self.knn_local < 0:
            raise ValueError(f"knn_local must be >= 0 (0: no local residual), got {self.knn_local}")
        if self.knn_k < 1 or self.feature_knn_k < 1 or self.feature_knn_bank < 2:
            raise ValueError(f"knn_k and feature_knn_k must be >= 1 and feature_knn_bank >= 2, got {self.knn_k}, "
                             f"{self.feature_knn_k} and {self.feature_knn_bank}")

    def to_dict(self) -> dict:
        """JSON-ready settings; ``mirror``, ``extreme_weight`` and ``knn_local`` only when set (``knn_local = 0``, the
        form before the residual, is left out), so detectors saved before they existed still match."""
        d = json.loads(json.dumps(asdict(self)))
        return {k: v for k, v in d.items() if k not in _WRITTEN_WHEN_SET or v}


_WRITTEN_WHEN_SET = ("mirror", "extreme_weight", "knn_local")


@dataclass(frozen=True)
class Recipe:
    """A method: which models it takes, its statistics and estimator, how many training images fit it.

    Attributes:
        name: Method name (command line, saved folder).
        summary: One line for ``--help`` and reports.
        models: Model kinds it works on (``score``, ``flow``).
        build: (model kind, config) → (statistics, estimator, log_scale).
        fit_n: Training images the estimator is fitted on; None: the run's ``--fit-n``.
    """

    name: str
    summary: str
    models: tuple[str, ...]
    build: Callable = field(repr=False)
    fit_n: int | None = None


FEATURE_SIGMA = 0.1
"""The feature k-NN's noise level when the score-norm grid does not set it (see :func:`feature_sigma`)."""


def feature_sigma(cfg: MethodConfig) -> float:
    """The feature k-NN's σ: ``cfg.feature_knn_sigma``, or the combined score norms' level nearest
    :data:`FEATURE_SIGMA` in log σ (their pass is then shared)."""
    if cfg.feature_knn_sigma is not None:
        return float(cfg.feature_knn_sigma)
    levels = cfg.sigmas[::cfg.combined_sigma_stride]
    return float(min(levels, key=lambda s: abs(math.log(s / FEATURE_SIGMA))))


def _score_norms(cfg: MethodConfig):
    from dgmood.statistics.score_norms import ScoreNorms

    return ScoreNorms(cfg.sigmas, cfg.batch_size)


def _combined(kind: str, cfg: MethodConfig):
    from dgmood.detectors.estimators import CombinedDetector
    from dgmood.statistics.complexity import Complexity
    from dgmood.statistics.feature_knn import FeatureKNN
    from dgmood.statistics.field import PixelDeviation, ScoreFieldDeviation
    from dgmood.statistics.flipd import FLIPD
    from dgmood.statistics.knn import PixelKNN
    from dgmood.statistics.local import LocalField
    from dgmood.statistics.orientation import Orientation
    from dgmood.statistics.reconstruction import Reconstruction
    from dgmood.statistics.score_norms import ScoreNorms

    make = {
        "msma": lambda: ScoreNorms(cfg.sigmas[::cfg.combined_sigma_stride], cfg.batch_size),
        "complexity": lambda: Complexity(cfg.complexity_codecs),
        "flipd": lambda: FLIPD(probes=cfg.combined_probes, seed=cfg.seed, batch_size=cfg.batch_size,
                               difference=cfg.flipd_difference),
        "reconstruction": lambda: Reconstruction(cfg.reconstruction_sigmas, cfg.reconstruction_steps, cfg.seed,
                                                 cfg.batch_size),
        "field": lambda: ScoreFieldDeviation(cfg.sigmas[::cfg.combined_sigma_stride]), "pixels": PixelDeviation,
        "local": lambda: LocalField(cfg.sigmas[::cfg.combined_sigma_stride], batch_size=cfg.batch_size),
        "fknn": lambda: FeatureKNN(feature_sigma(cfg), k=cfg.feature_knn_k, max_bank=cfg.feature_knn_bank,
                                   batch_size=cfg.batch_size),
        "orient": lambda: Orientation(cfg.orientation_grid, cfg.knn_k, cfg.orientation_bank, cfg.mirror),
        "knn": lambda: PixelKNN(cfg.knn_k, cfg.knn_local),
    }
    knn = "knn" in cfg.features  # its columns close the row: the distance, after the local residual when asked
    estimator = CombinedDetector(distance_columns=int(knn) * (1 + int(cfg.knn_local > 0)),
                                 distance_weight=cfg.knn_weight, max_components=cfg.max_components,
                                 acceptance=cfg.acceptance,
                                 hinge_columns=int("orient" in cfg.features and cfg.orientation_term == "hinge"),
                                 term_shape=cfg.term_shape, extreme_weight=cfg.extreme_weight)
    return [make[f]() for f in cfg.features], estimator, True


def explainer_for(method: str, kind: str, cfg: MethodConfig):
    """The anomaly map fitted with a detector: for the combined detector, the score field at its score-norm σ
    levels from :data:`MAP_SIGMA_MIN` up averaged with the nearest-image difference (one more pass over at most
    2,000 training images per σ at fit time); None for the others, whose explanations show the nearest-image
    difference when they keep a raw-pixel bank."""
    from dgmood.statistics.maps import AnomalyMap

    if kind != "score" or method != "combined":
        return None
    levels = [s for s in cfg.sigmas[::cfg.combined_sigma_stride] if s >= MAP_SIGMA_MIN] or [max(cfg.sigmas)]
    return AnomalyMap(levels, batch_size=min(cfg.batch_size, 256), neighbours=10)


def _msma(name: str):
    def build(kind: str, cfg: MethodConfig):
        from dgmood.detectors.estimators import DETECTORS

        return [_score_norms(cfg)], DETECTORS[name](acceptance=cfg.acceptance), False

    return build


def _pixel_knn(kind: str, cfg: MethodConfig):
    from dgmood.detectors.threshold import ThresholdDetector
    from dgmood.statistics.knn import PixelKNN

    return [PixelKNN(cfg.knn_k)], ThresholdDetector(column=0, sign=-1, acceptance=cfg.acceptance), True


def _dual(kind: str, cfg: MethodConfig):
    from dgmood.detectors.dual import DualThresholdDetector
    from dgmood.statistics.flipd import FLIPD
    from dgmood.statistics.likelihood import JacobianLID, LogLikelihood

    if kind == "flow":
        stats = [LogLikelihood("flow", seed=cfg.seed), JacobianLID(seed=cfg.seed)]
    else:
        stats = [LogLikelihood("diffusion", solver=cfg.solver, probes=cfg.probes, seed=cfg.seed),
                 FLIPD(probes=cfg.probes, seed=cfg.seed)]
    return stats, DualThresholdDetector(acceptance=cfg.acceptance), False


METHODS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("combined", "ours: score norms, complexity, FLIPD LID, reconstruction, network-feature k-NN and raw-pixel "
           "k-NN in one mixture",
           ("score",), _combined),
    Recipe("msma-knn", "MSMA: k-NN on multiscale score norms", ("score",), _msma("knn")),
    Recipe("msma-gmm", "MSMA: Gaussian mixture on multiscale score norms", ("score",), _msma("gmm")),
    Recipe("msma-flow", "MSMA: MAF flow on multiscale score norms", ("score",), _msma("flow")),
    Recipe("pixel-knn", "baseline: distance to the 5th nearest training image in raw pixels", ("score", "flow"),
           _pixel_knn),
    Recipe("dual-threshold", "likelihood and LID both above training thresholds (Kamkari et al. 2024)",
           ("flow", "score"), _dual, fit_n=500),
)}
"""Method name → recipe: the one registry of methods."""

ALIASES = {"knn": "msma-knn", "gmm": "msma-gmm", "flow": "msma-flow"}
"""Older detector names of the MSMA detectors."""


def method_names() -> list[str]:
    return list(METHODS)


def resolve_method(name: str) -> Recipe:
    """The recipe of a method name (or an alias); ValueError naming the choices."""
    recipe = METHODS.get(ALIASES.get(name, name))
    if recipe is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return recipe


def build_detector(method: str, model, kind: str, config: MethodConfig | None = None, device="cpu", cache=None,
                   progress: bool = False, runtime: str = "auto", resize: str = "crop") -> ImageDetector:
    """An unfitted :class:`ImageDetector` of ``method`` on ``model`` (of kind ``score`` or ``flow``); ``runtime`` and
    ``resize`` as in :class:`ImageDetector`."""
    recipe = resolve_method(method)
    if kind not in recipe.models:
        need = " or ".join(recipe.models)
        raise ValueError(f"method {recipe.name} needs a {need} model, not a {kind} model; train one with "
                         f"`dgmood train --model {recipe.models[0]}` or pick another --method")
    config = config or MethodConfig()
    statistics, estimator, log_scale = recipe.build(kind, config)
    return ImageDetector(model, statistics, estimator, recipe.name, log_scale, device, cache, progress,
                         explainer=explainer_for(recipe.name, kind, config), runtime=runtime, resize=resize)
