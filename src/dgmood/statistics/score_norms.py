"""MSMA features: multiscale score norms ‖σ_i s(x, σ_i)‖₂ (MSMA §3, eq. 4), computed once and cached."""

from __future__ import annotations

import hashlib
import json
import math
import time
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dgmood.utils import distributed as dist
from dgmood.utils.files import atomic_write, remove_leftovers
from dgmood.utils.progress import progress_bar

__all__ = ["FeatureCache", "FeatureSet", "column_names", "score_norms"]


@torch.no_grad()
def score_norms(
    model,
    images: np.ndarray | torch.Tensor,
    sigmas,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Score norms f_i(x) = ‖σ_i s(x, σ_i)‖₂ over all pixels of clean images (MSMA §3).

    Arguments:
        model: Module with ``scaled_score(x, σ)`` returning σ·s(x, σ).
        images: Clean images, shape (N, C, H, W), pixel scale [0, 1].
        sigmas: Noise levels, shape (L,), pixel scale.
        batch_size: Images per network call.

    Returns:
        Float32 array of shape (N, L); column i belongs to sigmas[i].
    """
    sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float32))
    images = torch.as_tensor(images)
    out = np.empty((len(images), len(sigmas)), dtype=np.float32)
    bar = progress_bar(total=len(images) * len(sigmas), desc="features", unit="img·σ", enabled=progress)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        for i, sigma in enumerate(sigmas):
            s = model.scaled_score(x, sigma.to(device).expand(len(x)))
            out[start : start + len(x), i] = s.flatten(1).norm(dim=1).cpu().numpy()
            bar.update(len(x))
    bar.close()
    return out


def column_names(sigmas) -> list[str]:
    """Feature column names, e.g. ``score_norm@sigma=0.01``."""
    return [f"score_norm@sigma={s:.4g}" for s in np.asarray(sigmas)]


@dataclass(frozen=True)
class FeatureSet:
    """A cached feature matrix with its provenance.

    Attributes:
        values: Array of shape (N, L).
        columns: L column names.
        meta: Provenance: model checksum, σ grid, dataset spec, count, seconds spent.
    """

    values: np.ndarray
    columns: list[str]
    meta: dict


def _cache_key(model_sha: str, sigmas, dataset: str) -> str:
    blob = json.dumps({"model": model_sha, "sigmas": [float(s) for s in sigmas], "data": dataset})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def damaged_cache_warning(path: Path, reason: str) -> None:
    """The one warning of a damaged cache file, which is then recomputed and replaced."""
    import warnings

    warnings.warn(f"cache file {path} is damaged ({reason}); recomputing it", RuntimeWarning, stacklevel=3)


def _corrupt_reason(values: np.ndarray, meta) -> str | None:
    """Why a cache file's contents cannot be a feature set (None when values and meta are consistent)."""
    if not isinstance(meta, dict):
        return "its meta is not a JSON object"
    sigmas, columns = meta.get("sigmas"), meta.get("columns")
    if not isinstance(sigmas, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sigmas):
        return "its meta has no list of sigma values"
    if not isinstance(columns, list) or len(columns) != len(sigmas) or not all(isinstance(c, str) for c in columns):
        return "its column names do not match its sigma values"
    if not isinstance(values, np.ndarray):  # a zip member that is not an .npy file comes back as bytes
        return "its values are not a numpy array"
    if values.dtype.kind != "f" or values.ndim != 2 or values.shape[1] != len(sigmas):
        return f"values of dtype {values.dtype} and shape {values.shape} do not fit {len(sigmas)} sigma values"
    return None


# What reading a damaged or forged .npz can raise (TypeError: an .npy, not an .npz; hypothesis-fuzzed).
NPZ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, MemoryError, RuntimeError, SyntaxError,
              tokenize.TokenError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path) -> tuple[np.ndarray, object]:
    """``values`` and the JSON ``meta`` of a cache file written by :func:`write_npz`, without pickle; raises one
    of ``NPZ_ERRORS`` on a damaged file."""
    with np.load(path, allow_pickle=False) as f:
        return f["values"], json.loads(str(f["meta"]))


def write_npz(path: Path, values: np.ndarray, meta: dict) -> Path:
    """Atomically write ``values`` and the JSON ``meta`` as one ``.npz``."""
    payload = {"values": values, "meta": np.array(json.dumps(meta))}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)

    return atomic_write(path, write)


def slug(dataset: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)[-60:]


class FeatureCache:
    """Feature matrices on disk, one ``.npz`` per (model, σ grid, dataset), loaded without pickle.

    Arguments:
        directory: Folder for the cache files (a run's ``features/``).
        model_sha: Checksum of the model weights the features come from.
    """

    def __init__(self, directory: Path, model_sha: str):
        self.directory, self.model_sha = Path(directory), model_sha

    def path(self, dataset: str, sigmas) -> Path:
        return self.directory / f"{slug(dataset)}-{_cache_key(self.model_sha, sigmas, dataset)}.npz"

    def load(self, dataset: str, sigmas) -> FeatureSet | None:
        """The cached features, or None when absent, damaged (with a warning: they are recomputed and the file
        replaced, the one policy of every statistic cache) or written for another model, dataset or σ grid.
        Temporaries of killed writes in the cache folder are deleted first (see :func:`dgmood.utils.files.is_leftover`)."""
        remove_leftovers(self.directory)
        path = self.path(dataset, sigmas)
        if not path.is_file():
            return None
        try:
            values, meta = read_npz(path)
            reason = _corrupt_reason(values, meta)
        except NPZ_ERRORS as err:
            reason = str(err) or type(err).__name__
        if reason is not None:
            damaged_cache_warning(path, reason)
            return None
        cached_sigmas = np.asarray(meta.get("sigmas", []), dtype=float)
        if (meta.get("model_sha256") != self.model_sha or meta.get("dataset") != dataset
                or cached_sigmas.shape != np.shape(sigmas) or not np.allclose(cached_sigmas, sigmas)):
            return None  # written for another model, dataset or σ grid (e.g. a copied or renamed file)
        return FeatureSet(values, meta["columns"], meta)

    def _meta(self, dataset: str, sigmas, values: np.ndarray, **extra) -> dict:
        return {"model_sha256": self.model_sha, "sigmas": [float(s) for s in sigmas], "dataset": dataset,
                "n": int(len(values)), "columns": column_names(sigmas), **extra}

    def save(self, dataset: str, sigmas, values: np.ndarray, **extra) -> FeatureSet:
        meta = self._meta(dataset, sigmas, values, **extra)
        write_npz(self.path(dataset, sigmas), values, meta)
        return FeatureSet(values, meta["columns"], meta)

    def get(self, dataset: str, sigmas, images_fn, model, device="cpu", batch_size=500, progress=True) -> FeatureSet:
        """Cached features of ``dataset``, computing them with ``model`` only when not cached.

        Arguments:
            images_fn: Zero-argument callable returning the images (N, C, H, W); called on a miss only.

        Under torchrun each process computes a contiguous shard of the images; the shards are gathered
        on every process and rank 0 alone writes the cache file (the others wait for it).
        """
        cached = self.load(dataset, sigmas)
        if cached is not None:
            return cached
        known = self._known_levels(dataset)
        missing = [float(s) for s in sigmas if _level(known, s) is None]
        extra = {"levels_computed": len(missing)}
        if missing:
            images = images_fn()
            start = time.perf_counter()
            new = dist.gather_shards(
                lambda part: score_norms(model, part, missing, batch_size, device, progress and dist.is_main()), images)
            seconds = time.perf_counter() - start
            known.update({s: new[:, j] for j, s in enumerate(missing)})
            # images per second of the whole grid, estimated from the levels computed now
            extra.update(seconds=seconds, images_per_s=len(images) / seconds * len(missing) / len(sigmas))
        values = np.stack([_level(known, s) for s in sigmas], axis=1)
        if dist.world_size() == 1:
            return self.save(dataset, sigmas, values, **extra)
        extra["processes"] = dist.world_size()
        saved = self.save(dataset, sigmas, values, **extra) if dist.is_main() else None
        dist.barrier()
        return saved or FeatureSet(values, column_names(sigmas), self._meta(dataset, sigmas, values, **extra))

    def _known_levels(self, dataset: str) -> dict[float, np.ndarray]:
        """σ → (N,) score norms of ``dataset`` from every valid cache file of this model, whatever its grid (a
        combined detector's five levels are MSMA's ten every other one: computed once, read by both)."""
        known: dict[float, np.ndarray] = {}
        for path in sorted(self.directory.glob(f"{slug(dataset)}-*.npz")):
            try:
                values, meta = read_npz(path)
            except NPZ_ERRORS:
                continue  # a damaged file of another grid: that grid's own load reports it
            if (meta.get("model_sha256") != self.model_sha or meta.get("dataset") != dataset
                    or _corrupt_reason(values, meta) is not None):
                continue
            known.update({float(s): values[:, j] for j, s in enumerate(meta.get("sigmas", []))})
        return known


def _level(known: dict[float, np.ndarray], sigma: float) -> np.ndarray | None:
    """The column of ``known`` at ``sigma`` (relative tolerance 1e-9), or None."""
    return next((v for s, v in known.items() if math.isclose(s, float(sigma), rel_tol=1e-9)), None)


from dgmood.statistics.base import Statistic, register  # noqa: E402  (the statistic wraps the function above)


@register
class ScoreNorms(Statistic):
    """MSMA's multiscale score norms ‖σ_i s(x, σ_i)‖₂ (MSMA §3, eq. 4) as a statistic: values (N, L).

    Args:
        sigmas: The σ grid, pixel scale (MSMA: 10 geometric levels 1 → 0.01).
        batch_size: Images per network call.
    """

    name = "score_norms"
    log_scale = True
    forward_only = True

    def __init__(self, sigmas=(1.0, 0.01), batch_size=500):
        self.sigmas = tuple(float(s) for s in sigmas)
        self.batch_size = int(batch_size)

    def compute(self, model, images, device="cpu", progress=False):
        return score_norms(model, images, self.sigmas, self.batch_size, device, progress).astype(np.float64)

    def cache_settings(self, training: bool = False) -> dict:
        return {"sigmas": [float(s) for s in self.sigmas]}

    def columns(self, n_columns: int) -> list[str]:
        return column_names(self.sigmas)
