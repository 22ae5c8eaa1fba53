"""Run directories: resolved config, checkpoint, feature cache, detectors, metrics and report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dgmood.data import datasets as datasets
from dgmood.data.datasets import head_spec  # noqa: F401  (part of the run API)
from dgmood.data.images import DEFAULT_RESIZE
from dgmood.utils import distributed as dist
from dgmood.models.checkpoint import CheckpointError, load_model, recover
from dgmood.utils.files import file_sha256, write_json
from dgmood.statistics.score_norms import FeatureCache, FeatureSet
from dgmood.models.flow import FlowConfig
from dgmood.models.registry import config_from_dict, model_kind
from dgmood.models.network import NetConfig
from dgmood.models.noise import geometric_sigmas
from dgmood.models.train import TrainConfig, train

__all__ = ["DEFAULT_HOLDOUT", "FeatureConfig", "HELDOUT", "Run", "RunConfig", "default_in_test", "head_spec",
           "holdout_indices", "resolve_device"]


@dataclass(frozen=True)
class FeatureConfig:
    """MSMA feature settings; σ on the [0, 1] pixel scale.

    Attributes:
        sigma_max, sigma_min, n_sigmas: The geometric σ grid (MSMA: 1 → 0.01, L = 10).
        fit_n: Training images (the first ``fit_n`` of the training set) whose features fit the
            detectors; 0 means all.
        batch_size: Images per network call.
    """

    sigma_max: float = 1.0
    sigma_min: float = 0.01
    n_sigmas: int = 10
    fit_n: int = 10000
    batch_size: int = 500

    def sigmas(self) -> np.ndarray:
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.n_sigmas)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run directory. ``net`` is the
    score network's (MSMA features, diffusion lens) or the image flow's (flow lens) architecture.
    ``method`` is the default detection method (:mod:`dgmood.methods.recipes`). ``holdout`` > 0: a seeded
    fraction of the training images (``holdout_seed``) is held out as the in-distribution test set
    ``heldout`` (for a custom training set without a named test split). ``resize`` is how every image is brought to
    ``net.image_shape`` (:mod:`dgmood.data.images`): chosen at training, used by every stage and saved detector."""

    data: str = "fashion-mnist"
    in_test: str = ""
    net: NetConfig | FlowConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    detectors: tuple[str, ...] = ("knn", "gmm", "flow")
    method: str = "combined"
    holdout: float = 0.0
    holdout_seed: int = 0
    resize: str = DEFAULT_RESIZE

    @property
    def model(self) -> str:
        """``"score"`` or ``"flow"``."""
        return model_kind(self.net)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dict(asdict(self), net=self.net.to_dict())))

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(
            data=d["data"], in_test=d.get("in_test", ""), net=config_from_dict(d["net"]),
            train=TrainConfig(**d["train"]), features=FeatureConfig(**d["features"]),
            detectors=tuple(d["detectors"]), method=d.get("method", "combined"),
            holdout=float(d.get("holdout", 0.0)), holdout_seed=int(d.get("holdout_seed", 0)),
            resize=d.get("resize", DEFAULT_RESIZE),
        )


HELDOUT = "heldout"
"""The in-distribution test spec of a run whose test images were held out of its training set."""

DEFAULT_HOLDOUT = 0.1
"""Fraction of a custom training set held out as its in-distribution test set when none is named."""


def holdout_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the ``ceil(fraction · n)`` held-out images among ``n`` (a seeded permutation)."""
    k = min(n - 1, max(1, int(np.ceil(fraction * n))))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def default_in_test(train_spec: str) -> str:
    """The in-distribution test set paired with a training set: ``NAME:test`` for a named set's
    train split; otherwise empty (the user must name one with ``--in``)."""
    spec = datasets.parse_spec(train_spec)
    if spec.kind == "named" and spec.split == "train" and spec.start is None and spec.stop is None:
        return f"{spec.name}:test"
    return ""


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


class Run:
    """One run directory. Every stage reads what earlier stages wrote and caches what it computes.

    Arguments:
        directory: The run directory.
        device: Torch device for network passes.
        data_dir: Where named datasets live (see :func:`dgmood.data.datasets.resolve_data_dir`).
        progress: Show progress bars.
    """

    def __init__(self, directory: Path, device: torch.device | str = "cpu", data_dir=None, progress=True):
        self.directory, self.device = Path(directory), torch.device(device)
        self.data_dir, self.progress = data_dir, progress
        self._config = self._model = self._model_sha = None

    @property
    def config(self) -> RunConfig:
        if self._config is None:
            path = self.directory / "config.json"
            if not path.is_file():
                raise ValueError(f"{self.directory} is not a dgmood run (no config.json); create it with `dgmood train`")
            self._config = RunConfig.from_dict(json.loads(path.read_text()))
        return self._config

    def save_config(self, config: RunConfig) -> None:
        """Write ``config`` as config.json (under torchrun rank 0 writes; every process keeps it in memory)."""
        if dist.is_main():
            write_json(self.directory / "config.json", config.to_dict())
        self._config = config

    def create(self, config: RunConfig) -> RunConfig:
        """Write ``config`` as the run's config; an existing run must agree on data and network."""
        path = self.directory / "config.json"
        if path.is_file():
            old = self.config
            if (old.data, old.net) != (config.data, config.net):
                raise ValueError(
                    f"{self.directory} already holds a run on {old.data!r} with another network; "
                    "pick a new --run directory"
                )
        in_test = config.in_test or default_in_test(config.data)
        if not in_test:  # a custom set with no test split: hold a seeded fraction of it out
            config = replace(config, holdout=config.holdout or DEFAULT_HOLDOUT)
            in_test = HELDOUT
        elif datasets.shared_images(config.data, in_test, self.data_dir):
            raise datasets.DataError(
                f"the in-distribution test set {in_test!r} holds training images of {config.data!r}, so every test "
                "score would be on an image the model has seen; leave out --in to hold part of the data out, or "
                "split it, e.g. --data 'mnist:test[:7000]' --in 'mnist:test[7000:]'")
        config = replace(config, in_test=in_test)
        self.save_config(config)
        return config

    def images(self, spec: str) -> np.ndarray:
        """Images of ``spec`` (N, C, H, W) checked against the model's image shape. With a held-out split, the
        training spec (and its slices) means the training part, ``heldout`` the held-out part."""
        cfg = self.config
        shape = tuple(cfg.net.image_shape)
        if cfg.holdout > 0:
            base, start, stop = datasets.split_slice(str(spec))
            if base in (cfg.data, HELDOUT):
                full = datasets.load_images(cfg.data, self.data_dir, shape=shape, resize=cfg.resize)
                held = np.zeros(len(full), bool)
                held[holdout_indices(len(full), cfg.holdout, cfg.holdout_seed)] = True
                part = full[held] if base == HELDOUT else full[~held]
                return np.ascontiguousarray(part[start:stop])
        return datasets.load_images(spec, self.data_dir, shape=shape, resize=cfg.resize)

    def train(self) -> None:
        """Train (or resume) the score model of this run."""
        cfg = self.config
        images = self.images(cfg.data)
        train(images, self.directory / "checkpoint", cfg.net, cfg.train, self.device, cfg.data, self.progress)
        self._model = self._model_sha = None

    @property
    def model(self):
        if self._model is None:
            self._model, _ = load_model(self.directory / "checkpoint", self.device)
            if self.config.model == "score":
                self._model = self._model.to(memory_format=torch.channels_last)
        return self._model

    @property
    def model_sha(self) -> str:
        """SHA-256 of the EMA weights: the key of every feature cache and fitted detector."""
        if self._model_sha is None:
            recover(self.directory / "checkpoint")  # a save cut short after its commit
            path = self.directory / "checkpoint" / "weights.safetensors"
            if not path.is_file():
                raise CheckpointError(f"no trained model in {self.directory}; run `dgmood train --run {self.directory}`")
            self._model_sha = file_sha256(path)
        return self._model_sha

    def fit_spec(self) -> str:
        """The dataset spec of the training images whose features fit the detectors."""
        cfg = self.config
        return head_spec(cfg.data, cfg.features.fit_n)

    def features(self, spec: str, sigmas=None) -> FeatureSet:
        """Score-norm features of ``spec`` on the run's σ grid (or ``sigmas``), cached."""
        if self.config.model != "score":
            raise ValueError(f"{self.directory} holds a {self.config.model} model; MSMA features need a score model "
                             "(`dgmood train --model score`); use `dgmood evaluate --method dual-threshold` on it")
        cfg = self.config.features
        sigmas = cfg.sigmas() if sigmas is None else np.asarray(sigmas)
        cache = FeatureCache(self.directory / "features", self.model_sha)
        return cache.get(spec, sigmas, lambda: self.images(spec), self.model, self.device, cfg.batch_size,
                         self.progress)

    # --- image detectors (dgmood.methods) ----------------------------------------------------------------------

    def method_config(self, **overrides):
        """The recipes' settings for this run: its σ grid and batch size, mirrors as no shift when it trained on
        mirrored images, plus ``overrides``."""
        from dgmood.methods.recipes import MethodConfig

        cfg = self.config.features
        return MethodConfig(**dict({"sigmas": tuple(float(s) for s in cfg.sigmas()), "batch_size": cfg.batch_size,
                                    "mirror": self.config.train.hflip}, **overrides))

    @property
    def cache(self):
        """The run's cache of statistic values (:class:`~dgmood.statistics.cache.StatisticCache`)."""
        from dgmood.statistics.cache import StatisticCache

        if getattr(self, "_cache", None) is None or self._cache.model_sha != self.model_sha:
            self._cache = StatisticCache(self.directory, self.model_sha, self.config.features.batch_size)
        return self._cache

    def detector_dir(self, method: str) -> Path:
        from dgmood.methods.recipes import resolve_method

        return self.directory / "detectors" / resolve_method(method).name

    def _fit_key(self, recipe) -> str:
        return self.fit_spec() if recipe.fit_n is None else head_spec(self.config.data, recipe.fit_n)

    def image_detector(self, method: str | None = None, config=None, refit: bool = False):
        """The run's fitted detector of ``method`` (default: the run's), loaded from ``detectors/METHOD`` when it
        was fitted on this model, training data and settings; otherwise fitted on training images and saved."""
        from dgmood.methods.image_detector import ImageDetector
        from dgmood.methods.recipes import build_detector, explainer_for, resolve_method

        recipe = resolve_method(method or self.config.method)
        config = config or self.method_config()
        folder, key = self.detector_dir(recipe.name), self._fit_key(recipe)
        expected = {"model_sha256": self.model_sha, "fit_data": key, "train_data": self.config.data,
                    "holdout": self.config.holdout, "config": config.to_dict()}
        if not refit and (folder / "detector.json").is_file():
            try:
                det = ImageDetector.load(folder, self.device)
            except CheckpointError:
                det = None  # damaged: fitted again below
            maps_expected = explainer_for(recipe.name, self.config.model, config) is not None
            if det is not None and {k: det.info.get(k) for k in expected} == json.loads(json.dumps(expected)) \
                    and (det.explainer is not None) == maps_expected \
                    and det.resize == self.config.resize:  # fitted before maps or resize policies existed: refit
                det.cache, det.progress = self.cache, self.progress
                return det
        det = build_detector(recipe.name, self.model, self.config.model, config, self.device, self.cache,
                             self.progress, resize=self.config.resize)
        n = len(self.images(key)) if recipe.fit_n is not None else self.config.features.fit_n
        det.fit(self.images(self.config.data), fit_n=n, key=key)
        det.info.update(expected)
        det.save(folder, weights_file=self.directory / "checkpoint" / "weights.safetensors")
        return det

    def evaluate_methods(self, methods: list[str], ood_specs: list[str], in_spec: str = "",
                         extra_sets: dict | None = None, config=None):
        """Fit (or load) each method's detector and score the in-distribution test set and each OOD set.

        Args:
            methods: Method names; the first is the main one.
            ood_specs: OOD dataset specs.
            in_spec: In-distribution test spec (default: the run's).
            extra_sets: More OOD sets, name → image loader (e.g. transformed test images); the name is the cache key.
            config: Recipe settings of the first method (default: :meth:`method_config`); the others use the default.

        Returns:
            (:class:`~dgmood.evaluation.evaluate.Evaluation`, {method: ImageDetector}).
        """
        from dgmood.evaluation.evaluate import check_sets, evaluate_detectors

        in_spec = in_spec or self.config.in_test
        check_sets(in_spec, [*ood_specs, *(extra_sets or {})])
        in_images = self.images(in_spec)  # every named set read and checked before any fitting
        ood_images = {spec: self.images(spec) for spec in ood_specs}
        detectors = {m: self.image_detector(m, config if i == 0 else None) for i, m in enumerate(methods)}
        loaders = {spec: (lambda s=spec: ood_images[s]) for spec in ood_specs} | dict(extra_sets or {})
        ev = evaluate_detectors(detectors, (in_spec, lambda: in_images), loaders)
        return ev, detectors

    # --- MSMA detectors on score norms (the --method msma evaluation) -----------------------------------------

    def fit_detectors(self) -> dict:
        """Fit the configured MSMA detectors (``msma-NAME`` image detectors) on the training features."""
        return {name: self.image_detector(f"msma-{name}", refit=True).estimator for name in self.config.detectors}

    def detectors(self) -> dict:
        """The fitted MSMA detectors' array estimators (name → estimator), fitted when missing or stale."""
        return {name: self.image_detector(f"msma-{name}").estimator for name in self.config.detectors}

    def evaluate(self, ood_specs: list[str], in_spec: str = "") -> tuple:
        """Score the in-distribution test set and each OOD set with every MSMA detector (``--method msma``): the
        one evaluation of :meth:`evaluate_methods` over the ``msma-NAME`` recipes, its methods named by detector
        (``knn``, ``gmm``, ``flow``), plus the score-norm features its report plots.

        Returns:
            (:class:`~dgmood.evaluation.evaluate.Evaluation`, spec → FeatureSet, detector name → ImageDetector).
        """
        in_spec = in_spec or self.config.in_test
        ev, detectors = self.evaluate_methods([f"msma-{name}" for name in self.config.detectors], list(ood_specs),
                                              in_spec)
        for table in (ev.results, ev.scores, ev.values, ev.seconds, detectors):
            renamed = {m.removeprefix("msma-"): v for m, v in table.items()}
            table.clear()
            table.update(renamed)
        return ev, {spec: self.features(spec) for spec in [in_spec, *ood_specs]}, detectors

    def write_outputs(self, ev, features: dict, detectors: dict, seconds: float) -> str:
        """The one output step (:func:`~dgmood.evaluation.evaluate.write_evaluation`) with MSMA's per-σ histograms
        and 2-D view added, and the first detector's galleries; returns the text metrics table."""
        from dgmood.evaluation import report
        from dgmood.evaluation.evaluate import write_evaluation
        from dgmood.methods.explain import galleries

        plots_dir = self.directory / "plots"
        in_values = features[ev.in_name].values
        ood_values = {s: features[s].values for s in ev.ood_names}
        plots = {
            "Score norms per σ, in-distribution vs OOD (MSMA Fig. 1a)": report.plot_histograms(
                in_values, ood_values, self.config.features.sigmas(), plots_dir / "histograms.png"),
            "2-D view of the score-norm space (MSMA Fig. 1b)": report.plot_embedding(
                self.features(self.fit_spec()).values, in_values, ood_values, plots_dir / "embedding.png"),
        }
        main = next(iter(ev.scores))
        return write_evaluation(self.directory, ev, self._context(features[ev.in_name], ev.in_name, seconds),
                                "dgmood OOD evaluation report", main, plots=plots,
                                galleries=galleries(detectors[main], ev, main))

    def _context(self, in_features: FeatureSet, in_spec: str, seconds: float) -> dict:
        cfg = self.config
        log = json.loads((self.directory / "checkpoint" / "checkpoint.json").read_text())["log"]
        in_meta = in_features.meta
        return {
            "training set": cfg.data,
            "in-distribution test set": in_spec,
            "detectors fitted on": self.fit_spec(),
            "model": f"ScoreNet channels {list(cfg.net.channels)}, patch {cfg.net.patch}",
            "model sha256": self.model_sha[:16],
            "training steps × batch": f"{log[-1]['step']} × {cfg.train.batch_size}",
            "final training loss": f"{log[-1]['loss']:.2f}",
            "train throughput": f"{log[-1]['images_per_s']:.0f} images/s",
            "σ grid": ", ".join(f"{s:.3g}" for s in cfg.features.sigmas()),
            "feature throughput": f"{in_meta.get('images_per_s', float('nan')):.0f} images/s (all σ)",
            "evaluation time": f"{seconds:.1f} s",
        }
