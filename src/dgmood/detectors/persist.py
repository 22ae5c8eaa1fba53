"""Save and load fitted detectors as JSON + safetensors (no pickles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import zuko
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from dgmood.utils.errors import CheckpointError
from dgmood.utils.files import atomic_write, checksum_matches, remove_leftovers, with_checksum, write_json
from dgmood.detectors.dual import DualThresholdDetector
from dgmood.detectors.estimators import CombinedDetector, FlowDetector, GMMDetector, KNNDetector
from dgmood.detectors.threshold import ThresholdDetector

__all__ = ["load_detector", "save_detector"]

_CLASSES = {cls.__name__: cls for cls in (GMMDetector, FlowDetector, KNNDetector, CombinedDetector, ThresholdDetector,
                                          DualThresholdDetector)}
_SCALER = ("mean_", "scale_", "var_")
_GMM = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")
# detector.json's checksum of its class, params and fitted values (absent in older files). The "meta"
# provenance is left out: every reader checks it against the run (a stale one means a refit or a clear
# "fitted on other weights" error, not a damaged file).
DETECTOR_SHA, _UNCHECKED = "detector_sha256", ("meta",)


def _arrays(det) -> dict[str, np.ndarray]:
    out = {}
    if getattr(det, "scaler_", None) is not None:
        out.update({f"scaler.{k}": getattr(det.scaler_, k) for k in _SCALER})
    if isinstance(det, GMMDetector):
        out.update({f"gmm.{k}": getattr(det.gmm_, k) for k in _GMM})
    elif isinstance(det, KNNDetector):
        out["knn.fit_X"] = np.asarray(det.neighbors_._fit_X)
    elif isinstance(det, FlowDetector):
        out.update({f"flow.{k}": v.numpy() for k, v in det.flow_.state_dict().items()})
    elif isinstance(det, DualThresholdDetector):
        out["dual.thresholds_"] = det.thresholds_
        for j, (knots, levels) in enumerate(zip(det.knots_, det.levels_)):
            out[f"dual.knots.{j}"], out[f"dual.levels.{j}"] = knots, levels
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _scalars(det) -> dict:
    keys = ("offset_", "n_features_in_", "n_components_", "n_neighbors_", "n_epochs_", "best_epoch_", "density_mean_",
            "density_std_", "extreme_mean_", "extreme_std_")
    out = {k: getattr(det, k) for k in keys if hasattr(det, k)}
    if isinstance(det, GMMDetector):
        out["cv_scores_"] = {str(k): v for k, v in det.cv_scores_.items()}
    return json.loads(json.dumps(out, default=float))


def save_detector(det, directory: Path, meta: dict | None = None) -> None:
    """Write a fitted detector to ``directory`` (``detector.json`` + ``arrays.safetensors``); temporaries
    of earlier killed writes there are deleted first (see :func:`dgmood.utils.files.is_leftover`)."""
    directory = Path(directory)
    remove_leftovers(directory)
    atomic_write(directory / "arrays.safetensors", lambda p: save_file(_arrays(det), str(p)))
    write_json(directory / "detector.json", with_checksum({
        "class": type(det).__name__, "params": json.loads(json.dumps(det.get_params())),
        "fitted": _scalars(det), "meta": meta or {},
    }, DETECTOR_SHA, _UNCHECKED))


def _restore_scaler(det, arrays: dict) -> None:
    det.scaler_ = None
    if "scaler.mean_" in arrays:
        det.scaler_ = StandardScaler()
        for k in _SCALER:
            setattr(det.scaler_, k, arrays[f"scaler.{k}"])
        det.scaler_.n_features_in_ = det.n_features_in_


def _restore_model(det, arrays: dict) -> None:
    if isinstance(det, GMMDetector):
        det.gmm_ = GaussianMixture(det.n_components_, covariance_type="full")
        for k in _GMM:
            setattr(det.gmm_, k, arrays[f"gmm.{k}"])
        det.cv_scores_ = {int(k): v for k, v in det.cv_scores_.items()}
    elif isinstance(det, KNNDetector):
        det.neighbors_ = NearestNeighbors(n_neighbors=det.n_neighbors_, algorithm="kd_tree").fit(arrays["knn.fit_X"])
    elif isinstance(det, DualThresholdDetector):
        det.thresholds_ = arrays["dual.thresholds_"]
        det.knots_ = [arrays[f"dual.knots.{j}"] for j in range(det.n_features_in_)]
        det.levels_ = [arrays[f"dual.levels.{j}"] for j in range(det.n_features_in_)]
    elif isinstance(det, FlowDetector):
        flow = zuko.flows.MAF(det.n_features_in_, transforms=det.transforms, hidden_features=tuple(det.hidden_features))
        state = {k[5:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("flow.")}
        flow.double().load_state_dict(state)
        det.flow_ = flow.eval()


def _check_restored(det, arrays: dict) -> None:
    """ValueError when the restored arrays do not fit the saved sizes (else a later score would crash or be wrong)."""
    d = det.n_features_in_
    shapes = {f"scaler.{k}": (d,) for k in _SCALER} if getattr(det, "standardize", False) else {}
    if isinstance(det, GMMDetector):
        k, m = det.n_components_, det.mixture_columns
        shapes.update({"gmm.weights_": (k,), "gmm.means_": (k, m), **{f"gmm.{n}": (k, m, m) for n in _GMM[2:]}})
    elif isinstance(det, KNNDetector):
        shapes["knn.fit_X"] = (len(arrays["knn.fit_X"]), d)
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(f"array {name} has shape {arrays[name].shape}, expected {shape}")
    det.decision_function(np.zeros((1, d)))  # every fitted part present and usable


def load_detector(directory: Path) -> tuple[object, dict]:
    """A fitted detector saved by :func:`save_detector`, and the meta saved with it."""
    directory = Path(directory)
    remove_leftovers(directory)
    try:
        info = json.loads((directory / "detector.json").read_text())
        if checksum_matches(info, DETECTOR_SHA, _UNCHECKED) is False:
            raise ValueError(f"detector.json does not match its {DETECTOR_SHA}: edited or damaged")
        arrays = load_file(str(directory / "arrays.safetensors"))
        det = _CLASSES[info["class"]](**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in info["params"].items()})
        for k, v in info["fitted"].items():
            setattr(det, k, v)
        _restore_scaler(det, arrays)
        _restore_model(det, arrays)
        _check_restored(det, arrays)
        meta = info["meta"]
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"saved detector in {directory} is missing or corrupt ({err}); rerun `dgmood fit`") from err
    return det, meta
