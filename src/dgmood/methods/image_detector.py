"""One fitted image detector: a trained generative model + per-image statistics + one array detector + its threshold.

The shape is scikit-learn's Pipeline: the statistics are transformers from images to feature columns (some fit
on training images: LID calibration, the raw-pixel k-NN bank), the last step is an outlier estimator on the
concatenated columns (:mod:`dgmood.detectors`), whose ``offset_`` is the threshold. Unlike a Pipeline the
transformers share one model and one cache of values, and the whole thing saves to one folder::

    DIR/detector.json            method, image shape, network config, statistics (class, params, fitted scalars),
                                 column names, threshold, provenance, and the SHA-256 of every file below
    DIR/model.safetensors        the model's (EMA) weights
    DIR/statistics.safetensors   fitted arrays of the statistics (the k-NN bank as uint8) and of the anomaly map
    DIR/estimator/               the array detector (detector.json + arrays.safetensors)

JSON + safetensors only, never pickles; the folder can be copied anywhere and loaded without the run.

Usage::

    det = ImageDetector.load("runs/demo/detectors/combined")
    det.score_samples(images)   # (N,) float64, higher = more in-distribution; images (N, H, W[, C]) uint8 or [0, 1]
    det.predict(images)         # (N,) int, +1 in-distribution / -1 OOD
    det.explain(images)         # scores, verdicts, per-column deviations, reasons, anomaly maps, nearest images
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgmood.data.datasets import prepare_images
from dgmood.data.images import DEFAULT_RESIZE, ImagePolicy
from dgmood.statistics.base import Statistic, as_columns, statistic_from_dict
from dgmood.statistics.maps import SMOOTH, AnomalyMap, difference_map, nearest_indices, smoothed_map
from dgmood.utils.errors import CheckpointError

__all__ = ["FORMAT", "Explanation", "ImageDetector", "reasons"]

FORMAT = "dgmood-image-detector/1"
_SHA = "detector_sha256"
_CHUNK = 2048  # images per pass when nothing is cached: bounded memory for any number of images
REASON_Z = 2.0
"""A column is a reason for a verdict when it lies this many training standard deviations from the mean."""


def reasons(z: np.ndarray, columns: list[str], top: int = 3, min_abs: float = REASON_Z) -> list[str]:
    """Per image, the (at most ``top``) columns furthest from training, e.g. ``complexity -4.1σ; knn +6.2σ``.

    Args:
        z: Standardised deviations (N, F) (:meth:`ImageDetector.deviations`).
        columns: F column names.
        top: How many columns to name.
        min_abs: Only columns at least this far out; an image with none gets ``""``.
    """
    out = []
    for row in np.asarray(z, dtype=np.float64):
        order = [j for j in np.argsort(-np.abs(np.nan_to_num(row, nan=np.inf)))[:top] if not abs(row[j]) < min_abs]
        out.append("; ".join(f"{columns[j]} {row[j]:+.1f}σ" for j in order))
    return out


@dataclass
class Explanation:
    """What :meth:`ImageDetector.explain` returns for N images.

    Attributes:
        scores: (N,) float64, higher = more in-distribution.
        verdicts: (N,) int, +1 in-distribution / -1 OOD.
        deviations: (N, F) each feature column's deviation from the training images, in their standard
            deviations (log columns on the log scale); NaN columns when the detector keeps no training moments.
        reasons: N strings naming the columns furthest out (:func:`reasons`).
        maps: (N, H, W) float32 anomaly maps (higher = more anomalous), or None when the detector has none.
        nearest: (N, C, H, W) nearest training images in raw pixels, or None without a raw-pixel k-NN bank.
        values: Statistic name → raw values.
    """

    scores: np.ndarray
    verdicts: np.ndarray
    deviations: np.ndarray
    reasons: list[str]
    maps: np.ndarray | None
    nearest: np.ndarray | None
    values: dict


class ImageDetector:
    """A generative model, its statistics and an array detector, fitted on training images only.

    Args:
        model: The trained network (``ScoreNet`` or ``ImageFlow``), eval mode; ``model.config`` its config.
        statistics: The per-image statistics, in column order.
        estimator: An unfitted (or fitted) dgmood array detector: ``fit``, ``score_samples``, ``offset_``.
        method: The recipe's name (``combined``, ``msma-knn``, ...), for display and saving.
        log_scale: Give the estimator log values of statistics that are positive norms / errors / distances.
        device: Torch device of the network passes.
        cache: A :class:`~dgmood.statistics.cache.StatisticCache` for named datasets, or None.
        progress: Progress bars on network passes.
        explainer: The anomaly map fitted with the detector (:class:`~dgmood.statistics.maps.AnomalyMap`),
            or None.
        runtime: Where forward-only statistics run the network: ``torch`` (the module), ``onnx`` (the module
            traced into ONNX Runtime, about 1.8× faster on CPUs, :mod:`dgmood.models.exported`) or ``auto``
            (``onnx`` for a score network on the CPU when onnxruntime is installed).
        resize: How images of another size or colour are brought to the model (``crop``, ``stretch``, ``pad``,
            ``error``; :mod:`dgmood.data.images`); saved with the detector (older saved detectors: ``error``).

    Attributes:
        columns_: Feature column names (after ``fit``).
        column_mean_, column_std_: (F,) the training feature columns' mean and standard deviation (after ``fit``),
            the scale of :meth:`deviations`.
        info: Provenance saved with the detector (model checksum, training data, fit time, ...).
    """

    def __init__(self, model, statistics: list[Statistic], estimator, method: str = "", log_scale: bool = True,
                 device="cpu", cache=None, progress: bool = False, explainer: AnomalyMap | None = None,
                 runtime: str = "auto", resize: str = DEFAULT_RESIZE):
        from dgmood.models.exported import resolve_runtime

        self.model, self.statistics, self.estimator = model, list(statistics), estimator
        self.resize = ImagePolicy(self.image_shape, resize).resize
        self.runtime = resolve_runtime(runtime, model, device)
        self._exported = None
        self.method, self.log_scale, self.device = method, log_scale, device
        self.cache, self.progress, self.explainer = cache, progress, explainer
        self.columns_: list[str] = []
        self.column_mean_ = self.column_std_ = None
        self.info: dict = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        stats = ", ".join(s.name for s in self.statistics)
        c, h, w = self.image_shape
        threshold = f", threshold={self.threshold:.4g}" if hasattr(self.estimator, "offset_") else ""
        return f"ImageDetector({self.method!r}, [{stats}], {type(self.estimator).__name__}, image {h}x{w}x{c}{threshold})"

    # --- shapes and validation --------------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes."""
        return tuple(int(d) for d in self.model.config.image_shape)

    @property
    def threshold(self) -> float:
        """Scores at or above it are in-distribution (the estimator's ``offset_``)."""
        return float(self.estimator.offset_)

    def prepare(self, images, label: str = "input") -> np.ndarray:
        """Images validated for the model, brought to its shape by :attr:`resize`, as float32 (N, C, H, W) in [0, 1]
        (:func:`dgmood.data.datasets.prepare_images`; raises DataError with a one-line message)."""
        return prepare_images(images, self.image_shape, label, self.resize)

    # --- statistics -------------------------------------------------------------------------------------------

    def network_for(self, stat) -> object:
        """The network ``stat`` runs on: the ONNX Runtime session of the model for a forward-only statistic (or
        the anomaly map) when the runtime is ``onnx``, else the module itself. Traced once, at first use."""
        if self.runtime != "onnx" or not stat.forward_only:
            return self.model
        if self._exported is None:
            from dgmood.models.exported import OnnxScoreNet

            try:
                self._exported = OnnxScoreNet(self.model)
            except Exception as err:  # noqa: BLE001  (any exporter or runtime failure: the module still works)
                import warnings

                warnings.warn(f"the network could not be run by ONNX Runtime ({type(err).__name__}: {err}); "
                              "using PyTorch", RuntimeWarning, stacklevel=2)
                self.runtime, self._exported = "torch", self.model
        return self._exported

    def statistic_values(self, images, key: str | None = None, training: bool = False) -> dict[str, np.ndarray]:
        """Raw values of every statistic: name → (N,) or (N, K).

        Args:
            images: Images (validated by :meth:`prepare`), or a zero-argument loader of them when ``key`` is given.
            key: Dataset name under which values are cached (with ``cache``); None computes without caching,
                in chunks of a few thousand images.
            training: The images are the training images the statistics were fitted on.
        """
        if key is not None and self.cache is not None:
            loaded = functools.cache(images if callable(images) else (lambda: self.prepare(images)))
            return {s.name: self.cache.values(s, key, loaded, self.network_for(s), self.device, self.progress, training)
                    for s in self.statistics}
        x = self.prepare(images() if callable(images) else images)
        parts = [self._compute(x[i:i + _CHUNK], training) for i in range(0, len(x), _CHUNK)] or [self._compute(x, training)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _compute(self, x: np.ndarray, training: bool) -> dict[str, np.ndarray]:
        with self._lock:  # one network pass at a time (a server shares the detector between threads)
            networks = self._chunk_networks()
            return {s.name: np.asarray((s.compute_training if training else s.compute)(
                net, x, self.device, self.progress), dtype=np.float64) for s, net in zip(self.statistics, networks)}

    def _chunk_networks(self) -> list:
        """Each statistic's network for one chunk of images: the forward-only ones share one
        :class:`~dgmood.models.shared_passes.SharedPasses` of their network when any statistic names
        ``shared_sigmas``, so a clean-image pass at such a σ runs once per chunk (cached values never need it)."""
        from dgmood.models.shared_passes import SharedPasses

        networks = [self.network_for(s) for s in self.statistics]
        sigmas = [sigma for s in self.statistics for sigma in s.shared_sigmas]
        if not sigmas:
            return networks
        shared: dict[int, SharedPasses] = {}
        return [shared.setdefault(id(net), SharedPasses(net, sigmas))
                if s.forward_only and hasattr(net, "scaled_score_and_mid") else net
                for s, net in zip(self.statistics, networks)]

    def columns(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The estimator's input (N, F): each statistic's values as columns, logged where ``log_scale``."""
        return np.concatenate([as_columns(values[s.name], self.log_scale and s.log_scale) for s in self.statistics],
                              axis=1)

    def transform(self, images, key: str | None = None, training: bool = False) -> np.ndarray:
        """Feature matrix (N, F) of images (see :meth:`statistic_values` for the arguments)."""
        return self.columns(self.statistic_values(images, key, training))

    # --- fit / score ------------------------------------------------------------------------------------------

    def fit(self, train_images, fit_n: int = 0, key: str | None = None) -> "ImageDetector":
        """Fit the statistics on all training images, then the estimator on the first ``fit_n`` (0: all).

        Args:
            train_images: Training images (N, C, H, W) or anything :meth:`prepare` takes.
            fit_n: How many training images (the first) the estimator is fitted on.
            key: Dataset name of those ``fit_n`` images in the cache (e.g. ``fashion-mnist[:5000]``), or None.
        """
        import time

        start = time.perf_counter()
        x = self.prepare(train_images, "training images")
        for stat in self.statistics:
            stat.fit(self.network_for(stat), x, self.device, self.progress)
        rows = x[:fit_n] if fit_n else x
        values = self.statistic_values((lambda: rows) if key else rows, key, training=True)
        features = self.columns(values)
        self.estimator.fit(features)
        self.columns_ = [c for s in self.statistics for c in s.columns(as_columns(values[s.name], False).shape[1])]
        self.column_mean_, self.column_std_ = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-12)
        if self.explainer is not None:
            bank = self.pixel_bank()
            with self._lock:
                self.explainer.fit(self.network_for(self.explainer), rows, self.device, self.progress,
                                   bank=bank if bank is not None and len(bank) == len(x) else None)
        self.info = dict(self.info, n_train=int(len(x)), n_fit=int(len(rows)), fit_seconds=time.perf_counter() - start)
        return self

    def score_samples(self, images, key: str | None = None) -> np.ndarray:
        """(N,) float64 in-distribution scores, higher = more in-distribution."""
        return self.score_values(self.statistic_values(images, key))

    def score_values(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """Scores from already computed :meth:`statistic_values`."""
        return np.asarray(self.estimator.score_samples(self.columns(values)), dtype=np.float64)

    def predict(self, images, key: str | None = None) -> np.ndarray:
        """(N,) int: +1 where the score reaches the threshold (in-distribution), else -1 (OOD)."""
        return np.where(self.score_samples(images, key) >= self.threshold, 1, -1)

    def deviations(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """(N, F) each feature column's deviation from the training images in their standard deviations:
        (column − training mean) / training std; NaN when the detector keeps no training moments (older folders)."""
        features = self.columns(values)
        if self.column_mean_ is None:
            return np.full(features.shape, np.nan)
        return (features - self.column_mean_) / self.column_std_

    def explain(self, images, maps: bool = True) -> Explanation:
        """Scores, verdicts and why: per-column deviations, reasons, anomaly maps and nearest training images.

        Args:
            images: Images as :meth:`prepare` takes them (N of them).
            maps: Compute the anomaly maps (one more network pass per map σ) and find the nearest training
                images; False leaves ``maps`` and ``nearest`` None.
        """
        x = self.prepare(images)
        values = self.statistic_values(x)
        scores = self.score_values(values)
        z = self.deviations(values)
        anomaly = nearest = None
        knn = self._pixel_knn()
        neighbours = None
        if maps and knn is not None:  # its bank made ready once, not per request
            k = getattr(self.explainer, "neighbours", 1)
            index = nearest_indices(knn.search_bank(), x, k=k).reshape(len(x), k)
            neighbours = (knn.bank_[index].astype(np.float32) / 255.0).reshape(len(x), k, *x.shape[1:])
            nearest = neighbours[:, 0]
            if self.explainer is None:  # the detector's own map replaces it below
                anomaly = smoothed_map(difference_map(x, nearest), SMOOTH)
        if maps and self.explainer is not None:
            with self._lock:
                anomaly = np.concatenate([self.explainer.compute(
                    self.network_for(self.explainer), x[i:i + _CHUNK], self.device,
                    nearest=None if neighbours is None else neighbours[i:i + _CHUNK])
                    for i in range(0, len(x), _CHUNK)])
        verdicts = np.where(np.isfinite(scores) & (scores >= self.threshold), 1, -1)
        return Explanation(scores, verdicts, z, reasons(z, self.columns_), anomaly, nearest, values)

    def pixel_bank(self) -> np.ndarray | None:
        """The raw-pixel training bank (M, D) uint8 of the detector's k-NN statistic, or None."""
        knn = self._pixel_knn()
        return None if knn is None else knn.bank_

    def _pixel_knn(self):
        """The raw-pixel k-NN statistic (a fitted uint8 bank it can search, made ready once), or None."""
        return next((s for s in self.statistics if hasattr(s, "search_bank")
                     and getattr(s, "bank_", None) is not None and s.bank_.dtype == np.uint8), None)

    def score(self, images) -> np.ndarray:
        """(N,) float64 scores of raw images (N, H, W[, C]) or (N, C, H, W), uint8 or [0, 1]; see :meth:`score_samples`."""
        return self.score_samples(images)

    @property
    def model_sha256(self) -> str:
        """SHA-256 of the model's weights file."""
        return str(self.info.get("model_sha256", ""))

    def describe(self) -> dict:
        """JSON-ready summary: method, statistics, estimator, threshold, image shape, model checksum."""
        return {"method": self.method, "statistics": [s.to_dict() for s in self.statistics],
                "estimator": type(self.estimator).__name__, "threshold": self.threshold,
                "image_shape": list(self.image_shape), "resize": self.resize, "model_sha256": self.model_sha256,
                "columns": self.columns_}

    # --- save / load ------------------------------------------------------------------------------------------

    def save(self, directory, weights_file: Path | None = None) -> Path:
        """Write the fitted detector as one folder (see the module docstring); replaces an older one whole.

        Args:
            directory: Target folder.
            weights_file: An existing safetensors file of the model's weights to copy (byte-identical, so its
                checksum stays the run's); default: the model's state dict.
        """
        from safetensors.numpy import save_file

        from dgmood.detectors.persist import save_detector
        from dgmood.utils.files import file_sha256, with_checksum, write_json

        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if weights_file is not None:
            shutil.copyfile(weights_file, tmp / "model.safetensors")
        else:
            from safetensors.torch import save_file as save_torch

            save_torch({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                       str(tmp / "model.safetensors"))
        stats, arrays = [], {}
        for i, stat in enumerate(self.statistics):
            scalars, fitted = stat.state()
            stats.append(dict(stat.to_dict(), state=scalars))
            arrays.update({f"{i}.{k}": np.ascontiguousarray(v) for k, v in fitted.items()})
        explainer = None
        if self.explainer is not None:
            scalars, fitted = self.explainer.state()
            explainer = dict(self.explainer.to_dict(), state=scalars)
            arrays.update({f"map.{k}": np.ascontiguousarray(v) for k, v in fitted.items()})
        save_file(arrays, str(tmp / "statistics.safetensors"))
        save_detector(self.estimator, tmp / "estimator", {"method": self.method})
        files = ["model.safetensors", "statistics.safetensors", "estimator/detector.json", "estimator/arrays.safetensors"]
        write_json(tmp / "detector.json", with_checksum({
            "format": FORMAT, "method": self.method, "image_shape": list(self.image_shape), "resize": self.resize,
            "net": self.model.config.to_dict(), "statistics": stats, "log_scale": self.log_scale,
            "columns": self.columns_, "threshold": self.threshold, "explainer": explainer,
            "column_moments": None if self.column_mean_ is None else {
                "mean": self.column_mean_.tolist(), "std": self.column_std_.tolist()}, "info": json.loads(json.dumps(self.info, default=str)),
            "files": {f: file_sha256(tmp / f) for f in files},
        }, _SHA))
        _replace_folder(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory, device="cpu", runtime: str = "auto") -> "ImageDetector":
        """A detector saved by :meth:`save`; CheckpointError (one line, what to do) when missing or damaged.
        ``runtime`` as in the constructor (not saved: it is a property of the machine, not of the detector)."""
        directory = Path(directory)
        meta = read_manifest(directory)
        try:
            return cls._from_manifest(directory, meta, device, runtime)
        except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
            raise CheckpointError(f"saved detector in {directory} cannot be loaded ({err}); fit it again") from err

    @classmethod
    def _from_manifest(cls, directory: Path, meta: dict, device, runtime: str = "auto") -> "ImageDetector":
        import torch
        from safetensors.numpy import load_file
        from safetensors.torch import load_file as load_torch

        from dgmood.detectors.persist import load_detector
        from dgmood.models.registry import build_model, config_from_dict

        model = build_model(config_from_dict(meta["net"]))
        model.load_state_dict(load_torch(str(directory / "model.safetensors")))
        model = model.to(device).eval()
        if meta["net"].get("kind", "score") == "score" and hasattr(model, "scaled_score"):
            model = model.to(memory_format=torch.channels_last)
        arrays = load_file(str(directory / "statistics.safetensors"))
        statistics = []
        for i, entry in enumerate(meta["statistics"]):
            stat = statistic_from_dict(entry)
            prefix = f"{i}."
            stat.set_state(entry.get("state", {}), {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            statistics.append(stat)
        explainer = None
        if meta.get("explainer"):
            explainer = AnomalyMap(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in meta["explainer"]["params"].items()})
            explainer.set_state(meta["explainer"].get("state", {}),
                                {k[4:]: v for k, v in arrays.items() if k.startswith("map.")})
        estimator, _ = load_detector(directory / "estimator")
        det = cls(model, statistics, estimator, meta["method"], bool(meta.get("log_scale", True)), device,
                  explainer=explainer, runtime=runtime, resize=meta.get("resize", "error"))
        det.columns_, det.info = list(meta.get("columns", [])), dict(meta.get("info", {}))
        if meta.get("column_moments"):
            det.column_mean_ = np.asarray(meta["column_moments"]["mean"], dtype=np.float64)
            det.column_std_ = np.asarray(meta["column_moments"]["std"], dtype=np.float64)
        det.info["model_sha256"] = meta["files"]["model.safetensors"]
        if abs(det.threshold - float(meta["threshold"])) > 1e-9 * max(1.0, abs(det.threshold)):
            raise ValueError("its estimator's threshold differs from detector.json's")
        return det


def read_manifest(directory: Path) -> dict:
    """``detector.json`` of a saved detector, its own checksum and every file's SHA-256 verified."""
    from dgmood.utils.files import checksum_matches, file_sha256

    path = Path(directory) / "detector.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no saved detector (no detector.json); fit one with `dgmood fit`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); fit the detector again") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dgmood image detector ({FORMAT}); fit the detector again")
    if checksum_matches(meta, _SHA) is False:
        raise CheckpointError(f"{path} does not match its {_SHA} (edited or damaged); fit the detector again")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path} lists no file checksums; fit the detector again")
    for name, sha in files.items():
        f = Path(directory) / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; copy the whole detector folder, or fit it again")
        if file_sha256(f) != sha:
            raise CheckpointError(f"{f} does not match its checksum in detector.json (damaged or replaced); "
                                  "fit the detector again")
    return meta


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``: the old folder is moved aside first and removed after, so a crash leaves
    the old or the new detector (a leftover ``.NAME.old-PID`` or ``.NAME.partial-PID`` is ignored)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
