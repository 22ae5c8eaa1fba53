"""Run directories: resolved config, checkpoint, feature cache, detectors, metrics and report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dgmood.data import datasets as datasets
from dgmood.data.datasets import head_spec  # noqa: F401  (part of the run API)
from dgmood.utils import distributed as dist
from dgmood.models.checkpoint import CheckpointError, load_model, recover
from dgmood.utils.files import file_sha256, write_json
from dgmood.statistics.score_norms import FeatureCache, FeatureSet
from dgmood.models.flow import FlowConfig
from dgmood.models.registry import config_from_dict, model_kind
from dgmood.models.network import NetConfig
from dgmood.models.noise import geometric_sigmas
from dgmood.models.train import TrainConfig, train

__all__ = ["FeatureConfig", "Run", "RunConfig", "default_in_test", "resolve_device"]


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
    score network's (MSMA features, diffusion lens) or the image flow's (flow lens) architecture."""

    data: str = "fashion-mnist"
    in_test: str = ""
    net: NetConfig | FlowConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    detectors: tuple[str, ...] = ("knn", "gmm", "flow")

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
            detectors=tuple(d["detectors"]),
        )


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
        config = replace(config, in_test=config.in_test or default_in_test(config.data))
        self.save_config(config)
        return config

    def images(self, spec: str) -> np.ndarray:
        """Images of ``spec`` (N, C, H, W) checked against the model's image shape."""
        return datasets.load_images(spec, self.data_dir, shape=tuple(self.config.net.image_shape))

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

    def _detector_meta(self) -> dict:
        sigmas = self.config.features.sigmas()
        return {"model_sha256": self.model_sha, "sigmas": [float(v) for v in sigmas], "fit_data": self.fit_spec()}

    def fit_detectors(self) -> dict:
        """Fit the configured detectors on the training features; saved under ``detectors/``."""
        from dgmood.detectors.estimators import DETECTORS
        from dgmood.detectors.persist import save_detector

        train_features = self.features(self.fit_spec()).values
        fitted = {}
        for name in self.config.detectors:
            start = time.perf_counter()
            det = DETECTORS[name]()
            if "verbose" in det.get_params():
                det.set_params(verbose=self.progress)
            fitted[name] = det.fit(train_features)
            meta = dict(self._detector_meta(), fit_seconds=time.perf_counter() - start, n_train=len(train_features))
            save_detector(fitted[name], self.directory / "detectors" / name, meta)
        return fitted

    def detectors(self) -> dict:
        """The fitted detectors, loaded from ``detectors/``; refitted when missing or stale."""
        from dgmood.detectors.persist import load_detector

        folder, expected = self.directory / "detectors", self._detector_meta()
        loaded = {n: load_detector(folder / n) for n in self.config.detectors if (folder / n).is_dir()}
        if len(loaded) < len(self.config.detectors) or any(
            {k: meta.get(k) for k in expected} != expected for _, meta in loaded.values()
        ):
            return self.fit_detectors()
        return {name: det for name, (det, _) in loaded.items()}

    def evaluate(self, ood_specs: list[str], in_spec: str = "") -> tuple[dict, dict, dict]:
        """Score the in-distribution test set and each OOD set with every detector.

        Returns:
            ``results`` (detector → OOD spec → metric → value), ``scores`` (detector →
            {"in": (N,), "ood": {spec: (M,)}}), and ``features`` (spec → FeatureSet).
        """
        from dgmood.evaluation.metrics import evaluate

        in_spec = in_spec or self.config.in_test
        if not in_spec:
            raise ValueError("no in-distribution test set known for this run; name one with --in SPEC")
        if not ood_specs:
            raise ValueError("no OOD set given; name at least one with --ood SPEC")
        detectors = self.detectors()
        features = {spec: self.features(spec) for spec in [in_spec, *ood_specs]}
        scores = {
            name: {"in": det.score_samples(features[in_spec].values),
                   "ood": {s: det.score_samples(features[s].values) for s in ood_specs}}
            for name, det in detectors.items()
        }
        results = {
            name: {s: evaluate(sc["in"], sc["ood"][s]) for s in ood_specs} for name, sc in scores.items()
        }
        write_json(self.directory / "evaluation.json", {"in": in_spec, "ood": list(ood_specs)})
        return results, scores, features

    def write_outputs(self, results: dict, scores: dict, features: dict, seconds: float) -> str:
        """Write metrics.json/.csv, the PNG plots and report.md; returns the text metrics table."""
        from dgmood.evaluation import report

        cfg, plots_dir = self.config, self.directory / "plots"
        evaluation = json.loads((self.directory / "evaluation.json").read_text())
        in_values = features[evaluation["in"]].values
        ood_values = {s: features[s].values for s in evaluation["ood"]}
        rows = report.metrics_table(results)
        report.write_metrics(self.directory, results)
        plots = {
            "ROC curves per OOD set": report.plot_roc(scores, plots_dir / "roc.png"),
            "Score norms per σ, in-distribution vs OOD (MSMA Fig. 1a)": report.plot_histograms(
                in_values, ood_values, cfg.features.sigmas(), plots_dir / "histograms.png"),
            "2-D view of the score-norm space (MSMA Fig. 1b)": report.plot_embedding(
                self.features(self.fit_spec()).values, in_values, ood_values, plots_dir / "embedding.png"),
        }
        report.write_report(self.directory, rows, plots, self._context(evaluation, seconds))
        return report.format_table(rows, "text")

    def _context(self, evaluation: dict, seconds: float) -> dict:
        cfg = self.config
        log = json.loads((self.directory / "checkpoint" / "checkpoint.json").read_text())["log"]
        in_meta = self.features(evaluation["in"]).meta
        return {
            "training set": cfg.data,
            "in-distribution test set": evaluation["in"],
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
