"""A fitted detector bundle: score model + σ grid + fitted detector + threshold, scoring raw images.

A run directory already is the bundle; :func:`load` reads only these files of it::

    RUN/config.json                       the run's config (default detector = the first listed)
    RUN/checkpoint/checkpoint.json        network config + SHA-256 of the weights (verified on load)
    RUN/checkpoint/weights.safetensors    EMA weights of the score model
    RUN/detectors/<name>/                 detector.json (σ grid, model SHA-256, threshold) + arrays.safetensors

so copying those four entries to another folder gives a deployable bundle (a few MB; the features
cache, plots and ``checkpoint/state.safetensors`` are not needed). Nothing is pickled.

Usage::

    import numpy as np
    import dgmood

    bundle = dgmood.load("runs/demo")                  # or dgmood.load("runs/demo", detector="gmm")
    images = np.load("my_images.npy")  # (N, H, W), (N, H, W, C) or (N, C, H, W); uint8 or float in [0, 1]
    scores = bundle.score(images)                      # (N,) float, higher = more in-distribution
    labels = bundle.predict(images)                    # (N,) int, +1 in-distribution / -1 OOD
    print(bundle.threshold, bundle.detector_name, bundle.model_sha256[:12])

Bad images raise :class:`dgmood.data.datasets.DataError` with the same one-line messages as the dataset
loaders (wrong shape or channels, size that does not match the model, NaN/inf, floats outside [0, 1]).
A bundle is safe to share between threads: network passes run one at a time under a lock.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from dgmood.models.checkpoint import CheckpointError, load_model
from dgmood.data.datasets import DataError, prepare_images

__all__ = ["Bundle", "load", "prepare_images"]


class Bundle:
    """A score model with its σ grid, one fitted detector and its threshold.

    Attributes:
        model: The :class:`dgmood.models.network.ScoreNet` (eval mode).
        sigmas: The σ grid the detector was fitted on, shape (L,).
        detector: The fitted detector (``score_samples`` / ``predict`` on (N, L) features).
        detector_name: Its name in the run (``knn``, ``gmm``, ``flow``).
        threshold: ``detector.offset_``: a score >= threshold is predicted in-distribution.
        model_sha256: SHA-256 of the weights file.
        image_shape: (C, H, W) the model takes.
        batch_size: (image, σ) pairs per network call.
        directory: Where the bundle was loaded from.
    """

    def __init__(self, model, sigmas, detector, detector_name: str, model_sha256: str, directory: Path,
                 batch_size: int = 500, device: torch.device | str = "cpu"):
        self.model, self.sigmas = model, np.asarray(sigmas, dtype=np.float64)
        self.detector, self.detector_name = detector, detector_name
        self.threshold = float(detector.offset_)
        self.model_sha256, self.directory = model_sha256, Path(directory)
        self.image_shape = tuple(int(d) for d in model.config.image_shape)
        self.batch_size, self.device = max(1, int(batch_size)), torch.device(device)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"Bundle({str(self.directory)!r}, detector={self.detector_name!r}, image {h}x{w}x{c}, "
                f"{len(self.sigmas)} σ, threshold={self.threshold:.4g}, model {self.model_sha256[:12]})")

    def prepare(self, images, label: str = "input") -> np.ndarray:
        """``images`` validated and converted to float32 (N, C, H, W), see :func:`prepare_images`."""
        return prepare_images(images, self.image_shape, label)

    @torch.no_grad()
    def _norms(self, x: np.ndarray) -> np.ndarray:
        """(N, L) score norms ‖σ_i s(x, σ_i)‖₂, the features of :func:`dgmood.statistics.score_norms.score_norms`.

        The (image, σ) pairs are flattened into batches, so one image costs one network call of L rows
        (measured 2× faster than L calls of one row on this CPU; equal to score_norms within 1e-6).
        """
        n, n_sigmas = len(x), len(self.sigmas)
        sigmas = torch.as_tensor(self.sigmas, dtype=torch.float32, device=self.device)
        out = np.empty((n, n_sigmas), dtype=np.float32)
        per_call = max(1, self.batch_size // n_sigmas)
        for start in range(0, n, per_call):
            chunk = torch.as_tensor(x[start:start + per_call]).to(self.device)
            rows = chunk.repeat_interleave(n_sigmas, dim=0).contiguous(memory_format=torch.channels_last)
            s = self.model.scaled_score(rows, sigmas.repeat(len(chunk)))
            out[start:start + len(chunk)] = s.flatten(1).norm(dim=1).reshape(len(chunk), n_sigmas).cpu().numpy()
        return out

    def features(self, images) -> np.ndarray:
        """(N, L) float32 multiscale score-norm features of ``images`` (validated as in :meth:`prepare`)."""
        x = self.prepare(images)
        with self._lock:
            return self._norms(x)

    def score(self, images) -> np.ndarray:
        """(N,) float64 in-distribution scores of ``images``, higher = more in-distribution."""
        x = self.prepare(images)
        with self._lock:
            return np.asarray(self.detector.score_samples(self._norms(x)), dtype=np.float64)

    def predict(self, images) -> np.ndarray:
        """(N,) int: +1 where the score reaches the threshold (in-distribution), else -1 (OOD)."""
        return np.where(self.score(images) >= self.threshold, 1, -1)

    def info(self) -> dict:
        """JSON-ready description: detector, threshold, model checksum, image shape, σ grid."""
        return {"detector": self.detector_name, "threshold": self.threshold, "model_sha256": self.model_sha256,
                "image_shape": list(self.image_shape), "sigmas": [float(s) for s in self.sigmas],
                "directory": str(self.directory)}


def _config(directory: Path) -> dict:
    """The parts of a run's config.json a bundle needs: detector names and the network batch size."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a dgmood run or bundle (no config.json); "
                              "give the --run directory of a fitted run")
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        detectors, features = config.get("detectors", []), config.get("features", {})
        return {"detectors": [str(d) for d in detectors] if isinstance(detectors, list) else [],
                "batch_size": int(features.get("batch_size", 500)) if isinstance(features, dict) else 500}
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} is unreadable or corrupt ({err}); restore it or rerun `dgmood run`") from err


def load(path, detector: str | None = None, device: torch.device | str = "cpu") -> Bundle:
    """Load the scoring bundle of a fitted run directory (see the module docstring for the files read).

    Args:
        path: The run (or bundle) directory.
        detector: Name of a fitted detector in ``path/detectors``; default the first in the run's config.
        device: Torch device of the network pass (``cpu``, ``cuda``, ``auto``).

    Returns:
        A :class:`Bundle`.

    Raises:
        CheckpointError: missing or corrupt files, or a detector fitted for other weights.
        ValueError: an unknown detector name.
    """
    from dgmood.detectors.persist import load_detector
    from dgmood.app.runs import resolve_device

    directory = Path(path)
    config = _config(directory)
    names = config["detectors"]
    name = detector or (names[0] if names else "knn")
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"bad detector name {name!r}; give a name like knn, gmm or flow")
    folder = directory / "detectors" / name
    if not folder.is_dir():
        fitted = sorted(p.name for p in (directory / "detectors").glob("*") if (p / "detector.json").is_file())
        if detector is not None and fitted:
            raise ValueError(f"no fitted detector {name!r} in {directory}; fitted: {', '.join(fitted)}")
        raise CheckpointError(f"no fitted detector {name!r} in {directory}; "
                              f"run `dgmood fit --run {directory} --detectors {name}`")
    device = resolve_device(str(device))
    model, meta = load_model(directory / "checkpoint", device)  # verifies the weights' SHA-256
    model = model.to(memory_format=torch.channels_last)
    model_sha = meta["sha256"]["weights.safetensors"]
    det, det_meta = load_detector(folder)
    if not isinstance(det_meta, dict) or det_meta.get("model_sha256") != model_sha:
        raise CheckpointError(f"detector {name!r} in {directory} was fitted on features of other weights; "
                              f"refit it with `dgmood fit --run {directory} --detectors {name}`")
    try:
        sigmas = np.asarray(det_meta.get("sigmas", []), dtype=np.float64)
    except (ValueError, TypeError):
        sigmas = np.empty(0)
    if (sigmas.ndim != 1 or len(sigmas) != getattr(det, "n_features_in_", -1) or not len(sigmas)
            or not (np.isfinite(sigmas) & (sigmas > 0)).all()):
        raise CheckpointError(f"detector {name!r} in {directory} has a σ grid that does not match its features; "
                              f"refit it with `dgmood fit --run {directory} --detectors {name}`")
    return Bundle(model, sigmas, det, name, model_sha, directory, config["batch_size"], device)
