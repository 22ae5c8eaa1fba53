"""Per-image statistics of the dual-threshold method (METHODS §3), through a flow or a diffusion lens, cached.

A *lens* is the trained model seen as a density with a local intrinsic dimension:
- ``flow``: the run's :class:`~dgmood.models.flow.ImageFlow`; exact log-likelihood, LID from the singular values of
  the generator Jacobian (``jacobian``), ‖∇ₓ log p(x)‖ as a baseline.
- ``diffusion``: the run's score network as a VP diffusion; PF-ODE log-likelihood, LID by ``flipd`` or
  ``normal-bundle``, score norm and reconstruction error as baselines.

Each statistic of each dataset is computed once and cached as ``RUN/lens/STAT/DATASET-KEY.npz`` (key: model
SHA-256, the statistic's settings, the dataset), so thresholds can be recalibrated and detectors refitted
without another network pass. Units: log-likelihood in nats per image on the [0, 1] pixel scale, bits per
dimension on the 8-bit scale.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from dgmood.utils.files import remove_leftovers
from dgmood.utils.progress import progress_bar

__all__ = ["LIDS", "LID_STATISTIC", "LensConfig", "StatCache", "compute_statistic", "parse_solver", "statistic_names"]

LIDS = {"flow": ("jacobian",), "diffusion": ("flipd", "normal-bundle")}
LID_STATISTIC = {"jacobian": "jacobian_sv", "flipd": "flipd", "normal-bundle": "normal_bundle_sv"}
"""The cached statistic each LID estimator is computed from (singular values, or FLIPD itself)."""


@dataclass(frozen=True)
class LensConfig:
    """How the dual-threshold statistics are computed.

    Attributes:
        lens: ``"flow"`` or ``"diffusion"``.
        lid: ``"jacobian"`` (flow), ``"flipd"`` or ``"normal-bundle"`` (diffusion).
        solver: PF-ODE solver of the diffusion likelihood, ``"adaptive"`` (Dormand–Prince), ``"heun"`` (``steps``
            fixed second-order steps) or ``"euler"`` (``steps`` first-order steps; the paper's 25 measured 1–3 bpd
            off the adaptive solution on FashionMNIST images).
        steps, spacing: Steps and time grid (``uniform`` or ``geometric`` in t) of the fixed-step solvers.
        tol: rtol = atol of the adaptive solver (1e-3: 0.01 bpd from 1e-4 at half the network calls).
        t_eps: Start time of the PF-ODE (VP scale).
        probes: Hutchinson probes for the PF-ODE divergence and the FLIPD trace.
        n_perturb: Perturbations K of the normal-bundle estimator.
        batch_size: Images per network call (the adaptive solver shares one step size per batch).
        seed: Seed of every probe and perturbation.
    """

    lens: str = "flow"
    lid: str = "jacobian"
    solver: str = "adaptive"
    tol: float = 1e-3
    steps: int = 25
    spacing: str = "uniform"
    t_eps: float = 1e-2
    probes: int = 4
    n_perturb: int = 784
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.lens not in LIDS:
            raise ValueError(f"unknown lens {self.lens!r}; choose flow or diffusion")
        if self.lid not in LIDS[self.lens]:
            raise ValueError(f"--lid {self.lid} does not work with the {self.lens} lens; choose "
                             f"{' or '.join(LIDS[self.lens])}")


def parse_solver(text: str) -> tuple[str, int, str]:
    """``SOLVER[:STEPS[:SPACING]]`` (e.g. ``heun:8:geometric``) as (solver, steps, spacing) of :class:`LensConfig`;
    omitted parts take its defaults. Raises a one-line ValueError on anything else."""
    from dgmood.models.diffusion import SOLVERS

    parts = str(text).strip().lower().split(":")
    solver, steps, spacing = (parts + ["", ""])[:3]
    if len(parts) > 3 or solver not in SOLVERS or spacing not in ("", "uniform", "geometric") or (
            steps and not (steps.isdigit() and int(steps) >= 1)) or (solver == "adaptive" and len(parts) > 1):
        raise ValueError(f"{text!r} is not a solver; use adaptive, or heun / euler with optional steps and time grid, "
                         "e.g. heun:8:geometric")
    return solver, int(steps or LensConfig.steps), spacing or LensConfig.spacing


def statistic_names(config: LensConfig) -> tuple[str, ...]:
    """The cached statistics of a lens: log-likelihood, the raw material of its LID, its baselines."""
    if config.lens == "flow":
        return ("log_likelihood", LID_STATISTIC[config.lid], "grad_norm", "complexity")
    return ("log_likelihood", LID_STATISTIC[config.lid], "score_norm", "reconstruction", "complexity")


def _settings(config: LensConfig, stat: str, **extra) -> dict:
    """The settings a statistic depends on (its cache key, beside model and dataset)."""
    keys = {
        "log_likelihood": ("lens", "solver", "tol", "t_eps", "probes", "seed"),
        "flipd": ("probes", "seed"), "normal_bundle_sv": ("n_perturb", "t_eps", "seed"),
        "reconstruction": ("seed",),
    }.get(stat, ())
    settings = {k: getattr(config, k) for k in keys}
    if stat in ("flipd", "reconstruction"):
        settings["noise"] = "per-image"  # ImageNoise: drawn per image from its content, not per batch
    if stat == "log_likelihood" and config.solver != "adaptive":
        settings.update(steps=config.steps, spacing=config.spacing)
    if stat == "log_likelihood" and config.lens == "flow":
        settings = {"lens": "flow"}
    return dict(settings, **extra)


# --- the statistics, one batch at a time ---------------------------------------------------------------------


def _flow_log_likelihood(flow, x, config, generator):
    from dgmood.models.flow import dequantize

    with torch.no_grad():
        return flow.log_prob(dequantize(x))


def _flow_jacobian_sv(flow, x, config, generator):
    from dgmood.models.flow import jacobian_singular_values

    return jacobian_singular_values(flow, x)


def _flow_grad_norm(flow, x, config, generator):
    from dgmood.models.flow import dequantize

    with torch.enable_grad():
        xg = dequantize(x).requires_grad_(True)
        (grad,) = torch.autograd.grad(flow.log_prob(xg).sum(), xg)
    return grad.flatten(1).norm(dim=1)


def _diffusion_log_likelihood(model, x, config, generator):
    from dgmood.models.diffusion import pf_ode_log_likelihood

    return pf_ode_log_likelihood(model, x, t_eps=config.t_eps, probes=config.probes, solver=config.solver,
                                 steps=config.steps, spacing=config.spacing, rtol=config.tol, atol=config.tol,
                                 generator=generator)["nats"]


def _diffusion_flipd(model, x, config, generator, sigma0: float, difference: float | None = None):
    from dgmood.models.diffusion import ImageNoise, flipd

    # probes seeded by each image (not its place in the batch): an image's LID is the same in any batch
    return flipd(model, x, sigma0, probes=config.probes, generator=ImageNoise(x, config.seed), difference=difference)


def _diffusion_normal_bundle_sv(model, x, config, generator):
    from dgmood.models.diffusion import normal_bundle_lid

    return normal_bundle_lid(model, x, t0=config.t_eps, n_perturb=config.n_perturb, generator=generator)[1]


def _diffusion_score_norm(model, x, config, generator, sigma_min: float = 0.01):
    from dgmood.models.diffusion import score_norm

    return score_norm(model, x, sigma_min)


def _diffusion_reconstruction(model, x, config, generator, **levels):
    """Reconstruction errors (N, L); ``levels`` may set ``sigmas`` and ``steps`` (part of the cache key)."""
    from dgmood.models.diffusion import ImageNoise, reconstruction_error

    return reconstruction_error(model, x, generator=ImageNoise(x, config.seed), **levels)


def _complexity(model, x, config, generator):
    from dgmood.statistics.complexity import compressed_bits_per_dim

    return torch.from_numpy(compressed_bits_per_dim(x.cpu().numpy()))


_STATISTICS: dict[tuple[str, str], Callable] = {
    ("flow", "log_likelihood"): _flow_log_likelihood,
    ("flow", "jacobian_sv"): _flow_jacobian_sv,
    ("flow", "grad_norm"): _flow_grad_norm,
    ("diffusion", "log_likelihood"): _diffusion_log_likelihood,
    ("diffusion", "flipd"): _diffusion_flipd,
    ("diffusion", "normal_bundle_sv"): _diffusion_normal_bundle_sv,
    ("diffusion", "score_norm"): _diffusion_score_norm,
    ("diffusion", "reconstruction"): _diffusion_reconstruction,
    ("flow", "complexity"): _complexity,
    ("diffusion", "complexity"): _complexity,
}


def compute_statistic(model, images: np.ndarray, config: LensConfig, stat: str, device="cpu",
                      progress: bool = True, **extra) -> tuple[np.ndarray, float]:
    """One statistic of every image, batched: values of shape (N,) or (N, K) (singular values), float64,
    and the seconds per image it took. ``extra`` holds the statistic's own parameter (FLIPD's σ₀)."""
    fn = _STATISTICS[(config.lens, stat)]
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out, start = [], time.perf_counter()
    bar = progress_bar(total=len(data), desc=stat, unit="img", enabled=progress)
    for batch in data.split(config.batch_size):
        out.append(fn(model, batch.to(device), config, generator, **extra).detach().double().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    seconds = (time.perf_counter() - start) / max(1, len(data))
    return np.concatenate(out) if out else np.zeros(0), seconds


# --- the cache -----------------------------------------------------------------------------------------------


class StatCache:
    """Statistics of datasets under one model, as ``DIRECTORY/STAT/DATASET-KEY.npz`` (values + JSON meta)."""

    def __init__(self, directory: Path, model_sha: str):
        self.directory, self.model_sha = Path(directory), model_sha

    def path(self, stat: str, settings: dict, dataset: str) -> Path:
        from dgmood.statistics.score_norms import slug

        blob = json.dumps([self.model_sha, stat, settings, dataset], sort_keys=True)
        return self.directory / stat / f"{slug(dataset)}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"

    def load(self, stat: str, settings: dict, dataset: str) -> tuple[np.ndarray, dict] | None:
        """Cached values and meta, or None when absent, damaged (with a warning) or written for another model,
        settings or dataset (then recomputed). Temporaries of killed writes are deleted first."""
        from dgmood.statistics.score_norms import NPZ_ERRORS, damaged_cache_warning, read_npz

        path = self.path(stat, settings, dataset)
        remove_leftovers(path.parent)
        if not path.is_file():
            return None
        try:
            values, meta = read_npz(path)
        except NPZ_ERRORS as err:
            damaged_cache_warning(path, str(err) or type(err).__name__)
            return None
        if (not isinstance(meta, dict) or not isinstance(values, np.ndarray) or values.dtype.kind != "f"
                or not np.isfinite(values).all()):
            damaged_cache_warning(path, "its values or meta are not what this cache writes")
            return None
        expected = {"model_sha256": self.model_sha, "stat": stat, "settings": settings, "dataset": dataset}
        if any(meta.get(k) != v for k, v in json.loads(json.dumps(expected)).items()):
            return None  # another model, settings or dataset (a copied or renamed file)
        return values, meta

    def save(self, stat: str, settings: dict, dataset: str, values: np.ndarray, **extra) -> dict:
        from dgmood.statistics.score_norms import write_npz

        meta = dict(model_sha256=self.model_sha, stat=stat, settings=settings, dataset=dataset, **extra)
        path = self.path(stat, settings, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, values, meta)
        return meta

    def get(self, stat: str, config: LensConfig, dataset: str, images_fn: Callable[[], np.ndarray], model,
            device="cpu", progress: bool = True, **extra) -> tuple[np.ndarray, dict]:
        """Cached values of ``stat`` on ``dataset`` (computed from ``images_fn()`` on a miss) and their meta."""
        settings = _settings(config, stat, **extra)
        hit = self.load(stat, settings, dataset)
        if hit is not None:
            return hit
        values, seconds = compute_statistic(model, images_fn(), config, stat, device, progress, **extra)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).any(axis=tuple(range(1, values.ndim))).sum())
            raise ValueError(f"{stat} of {dataset} is not finite for {bad} images; the model may have diverged")
        meta = self.save(stat, settings, dataset, values, seconds_per_image=seconds, n=len(values))
        return values, meta


def settings_dict(config: LensConfig) -> dict:
    """The lens config as plain JSON types."""
    return json.loads(json.dumps(asdict(config)))
