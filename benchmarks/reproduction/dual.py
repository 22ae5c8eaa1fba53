"""Reproduction of the dual-threshold paper's findings (Kamkari et al., ICLR 2024): docs/reproduction.md's tables.

One command of ``benchmarks/reproduce.py`` per finding:

- ``dual-hist`` (Fig. 2, App. A): likelihoods of in-distribution test images, OOD images and the model's own
  samples; OOD images get higher likelihoods than in-distribution ones, generated samples lower than both.
- ``dual-gen`` (App. D.4, Tables 6-8): "FMNIST-gen vs MNIST", the model's samples as the in-distribution set,
  with τ / σ₀ and the thresholds of the FMNIST-trained run kept (no recalibration).
- ``dual-ablation`` (App. C, Table 2): AUROCs and mean LID at the LPCA-calibrated τ / σ₀ against fixed values.
- ``dual-scatter`` (Figs. 1 and 4): the run's stored dual evaluation redrawn (likelihood–LID scatter, dual ROC).

Run-side functions read statistics through :class:`LensStats`, which caches every statistic of every set in the
run's lens cache (``RUN/lens``, shared with ``dgmood evaluate --method dual-threshold``), and samples in
``RUN/samples``; table functions take arrays and return rows for :func:`dgmood.reproduce.markdown_table`; plot
functions write one PNG. Likelihoods are log p in nats per image on the [0, 1] pixel scale, or bits per dimension
on the 8-bit scale (lower = more likely). AUROCs treat the in-distribution set as the positive class.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dgmood.detectors.dual import DualThresholdDetector, optimal_roc_auc
from dgmood.methods.dual_threshold import DualConfig, calibration_set_name, evaluate_dual, lid_from_sv
from dgmood.statistics.score_norms import NPZ_ERRORS, read_npz, write_npz
from dgmood.models.flow import bits_per_dim
from dgmood.statistics.lens import LID_STATISTIC, LIDS, LensConfig, StatCache
from dgmood.evaluation.metrics import auroc
from reproduction.msma import figure_grid, save_png
from dgmood.app.runs import Run, default_in_test
from dgmood.data.datasets import head_spec

__all__ = [
    "ABLATION_COLUMNS", "GEN_COLUMNS", "HIST_COLUMNS", "SCATTER_COLUMNS", "LensSetup", "LensStats",
    "ablation_rows", "draw_samples", "generated_set", "hist_rows", "open_lens", "plot_ablation", "plot_gen",
    "plot_hist", "quantize", "scatter_outputs", "stored_dual", "task_row",
]

SET_LABELS = {"in": "in-dist. test", "ood": "OOD", "generated": "generated"}
_SET_COLORS = {"in": "C0", "ood": "C3", "generated": "C2"}

# ----------------------------------------------------------------------------- generated samples


def quantize(x: np.ndarray, levels: int = 256) -> np.ndarray:
    """Round images in [0, 1] to ``levels`` grey levels k / (levels − 1), as an 8-bit image file does; float32."""
    return (np.round(np.clip(x, 0, 1) * (levels - 1)) / (levels - 1)).astype(np.float32)


def draw_samples(model, n: int, seed: int = 0, steps: int = 18, temperature: float = 1.0, batch_size: int = 50,
                 device="cpu") -> np.ndarray:
    """``n`` samples of a run's model, quantised to 8 bits: shape (n, C, H, W), values k/255.

    A score network is sampled by EDM's deterministic Heun sampler with ``steps`` σ values
    (:func:`dgmood.models.sampling.sample_score_model`); a flow as g(T·z), z ~ N(0, I), T = ``temperature``
    (:meth:`dgmood.models.flow.ImageFlow.sample`). Both draw their noise from ``torch.Generator().manual_seed(seed)``.
    """
    from dgmood.models.flow import ImageFlow
    from dgmood.models.sampling import sample_score_model

    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, ImageFlow):
        x = model.sample(n, temperature=temperature, generator=generator).cpu().numpy()
    else:
        x = sample_score_model(model, n, steps=steps, generator=generator, batch_size=batch_size, device=device)
    return quantize(x)


def _sample_settings(run: Run, n: int, seed: int, steps: int, temperature: float) -> dict:
    """What a sample set depends on besides the weights (the sampler's knob of the run's model kind)."""
    knob = {"steps": steps} if run.config.model == "score" else {"temperature": temperature}
    return {"model": run.config.model, "n": n, "seed": seed, **knob, "levels": 256}


def _samples_path(run: Run, settings: dict) -> Path:
    blob = json.dumps([run.model_sha, settings], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return run.directory / "samples" / f"{settings['model']}-n{settings['n']}-seed{settings['seed']}-{key}.npz"


def generated_set(run: Run, n: int, seed: int = 0, steps: int = 18, temperature: float = 1.0
                  ) -> tuple[str, Callable[[], np.ndarray]]:
    """The dataset name of ``n`` model samples and a function returning them, drawn once and cached.

    The samples live in ``RUN/samples/MODEL-nN-seedS-KEY.npz`` (key: SHA-256 of the weights and the settings),
    written by :func:`dgmood.statistics.score_norms.write_npz` with the settings as meta; a damaged or foreign file is redrawn.
    The name, ``generated:`` + the file's stem, keys the statistics of the samples in the lens cache.
    """
    settings = _sample_settings(run, n, seed, steps, temperature)
    path = _samples_path(run, settings)

    def images() -> np.ndarray:
        try:
            values, meta = read_npz(path)
            expected = {"settings": settings, "model_sha256": run.model_sha}
            if isinstance(meta, dict) and all(meta.get(k) == v for k, v in expected.items()):
                return values
        except NPZ_ERRORS:
            pass
        start = time.perf_counter()
        values = draw_samples(run.model, n, seed, steps, temperature, device=run.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, values, {"model_sha256": run.model_sha, "settings": settings,
                                 "seconds": time.perf_counter() - start})
        return values

    return f"generated:{path.stem}", images


# ----------------------------------------------------------------------------- statistics through one lens


def stored_dual(run: Run, lid: str = "") -> tuple[DualConfig, dict, dict]:
    """The run's stored dual evaluation (``RUN/dual-LENS-LID/``): its config, calibration.json and evaluation.json.

    The config is rebuilt from evaluation.json (lens settings, thresholds' training head) and the calibration's
    key (LPCA and calibration-point settings), so statistics hit the cache the evaluation filled. The calibration
    is read, never recomputed; it must belong to the run's current weights.

    Arguments:
        run: A run whose dual evaluation was written by ``dgmood evaluate --method dual-threshold``.
        lid: LID estimator; default the lens's first (``jacobian`` for a flow, ``flipd`` for a score model).
    """
    lens = "flow" if run.config.model == "flow" else "diffusion"
    folder = run.directory / f"dual-{lens}-{lid or LIDS[lens][0]}"
    if not (folder / "calibration.json").is_file() or not (folder / "evaluation.json").is_file():
        raise ValueError(f"no stored dual evaluation in {folder}; run `dgmood evaluate --run {run.directory} "
                         f"--method dual-threshold --lens {lens} --lid {lid or LIDS[lens][0]}` first")
    calibration = json.loads((folder / "calibration.json").read_text())
    evaluation = json.loads((folder / "evaluation.json").read_text())
    if calibration["key"]["model_sha256"] != run.model_sha:
        raise ValueError(f"{folder / 'calibration.json'} was calibrated for other weights; re-run the evaluation")
    config = DualConfig(lens=LensConfig(**evaluation["lens"]), fit_n=evaluation["fit_n"], **calibration["key"]["setup"])
    return config, calibration, evaluation


class LensStats:
    """Per-image statistics of one run through its lens on named sets, each computed once into ``RUN/lens``.

    Arguments:
        run: The run (its model, device, data and progress setting).
        config: Lens settings and calibration setup, e.g. from :func:`stored_dual`.
        images: Set name → function returning its images (N, C, H, W), for sets no dataset spec names (samples,
            calibration points); other names are loaded with ``run.images``.
    """

    def __init__(self, run: Run, config: DualConfig, images: Mapping[str, Callable[[], np.ndarray]] | None = None):
        self.run, self.config = run, config
        self.cache = StatCache(run.directory / "lens", run.model_sha)
        self.images = dict(images or {})
        self.dim = int(np.prod(run.config.net.image_shape))
        self.seconds: dict[tuple[str, str], float] = {}

    def stat(self, name: str, spec: str, **extra) -> np.ndarray:
        """Statistic ``name`` of every image of set ``spec``: (N,) or (N, K), cached (``extra``: FLIPD's σ₀)."""
        images_fn = self.images.get(spec) or (lambda: self.run.images(spec))
        values, meta = self.cache.get(name, self.config.lens, spec, images_fn, self.run.model, self.run.device,
                                      self.run.progress, **extra)
        self.seconds.setdefault((name, spec), meta.get("seconds_per_image", float("nan")))
        return values

    def log_likelihood(self, spec: str) -> np.ndarray:
        """log p(x) in nats per image on the [0, 1] scale, shape (N,)."""
        return self.stat("log_likelihood", spec)

    def bits_per_dim(self, spec: str) -> np.ndarray:
        """Negative log-likelihood in bits per dimension on the 8-bit scale, shape (N,)."""
        return bits_per_dim(self.log_likelihood(spec), self.dim)

    def lid(self, spec: str, value: float) -> np.ndarray:
        """LID at τ = ``value`` (flow: #{singular values of ∂g/∂z > τ}) or σ₀ = ``value`` (FLIPD), shape (N,)."""
        lid = self.config.lens.lid
        if lid == "flipd":
            return self.stat("flipd", spec, sigma0=float(value))
        if lid != "jacobian":
            raise ValueError(f"LID {lid!r} is not reproduced here; use jacobian (flow) or flipd (diffusion)")
        return lid_from_sv(self.stat(LID_STATISTIC[lid], spec), value, lid, self.dim)

    def pairs(self, spec: str, value: float) -> np.ndarray:
        """(log-likelihood in nats, LID at ``value``) per image, shape (N, 2): higher = more in-distribution."""
        return np.column_stack([self.log_likelihood(spec), self.lid(spec, value)])

    def calibration_set(self) -> str:
        """The name of the run's LID calibration points (METHODS §3), registered; the name dualrun caches under."""
        from dgmood.statistics.calibrate import calibration_points

        data, n, seed = self.run.config.data, self.config.calibration_n, self.config.lens.seed
        name = calibration_set_name(data, n, seed)

        def images() -> np.ndarray:
            train = self.run.images(data)
            return train[calibration_points(len(train), n, seed=seed)]

        self.images.setdefault(name, images)
        return name


@dataclass(frozen=True)
class LensSetup:
    """One lens of the reproduction and the sets it is evaluated on.

    Attributes:
        run: Run directory with a stored dual evaluation (``RUN/dual-LENS-LID/``).
        n_test: Images of the in-distribution test set, of the OOD set, and of the training head that fits the
            dual thresholds (each the first ``n_test``; pick sizes the run's lens cache holds).
        n_generated: Model samples.
        in_spec: In-distribution test set; empty: ``NAME:test`` of the run's training set.
        ood_spec: OOD test set.
        seed: Seed of the samples.
        progress: Show progress bars of network passes.
    """

    run: Path
    n_test: int
    n_generated: int
    in_spec: str = ""
    ood_spec: str = "mnist:test"
    seed: int = 0
    progress: bool = False


def open_lens(setup: LensSetup) -> tuple[LensStats, dict, dict[str, str]]:
    """The statistics of a lens, its stored calibration, and its set names by role: ``in``, ``ood``, ``fit``
    (thresholds' training head) and ``generated`` (samples, drawn only when a statistic of them is asked for)."""
    run = Run(setup.run, progress=setup.progress)
    config, calibration, _ = stored_dual(run)
    in_base = setup.in_spec or default_in_test(run.config.data) or run.config.in_test
    gen_name, gen_images = generated_set(run, setup.n_generated, setup.seed)
    specs = {"in": head_spec(in_base, setup.n_test), "ood": head_spec(setup.ood_spec, setup.n_test),
             "fit": head_spec(run.config.data, setup.n_test), "generated": gen_name}
    return LensStats(run, config, {gen_name: gen_images}), calibration, specs


# ----------------------------------------------------------------------------- dual-hist: likelihood histograms


HIST_COLUMNS = {
    "lens": ("lens", ""), "set": ("set", ""), "n": ("n", "d"),
    "mean": ("mean bpd", ".3f"), "median": ("median bpd", ".3f"), "p5": ("5 % bpd", ".3f"), "p95": ("95 % bpd", ".3f"),
    "above_in": ("P(ℓ > ℓ of in-dist. test)", ".3f"), "above_ood": ("P(ℓ > ℓ of OOD)", ".3f"),
}


def _prob_higher(bpd_a: np.ndarray, bpd_b: np.ndarray) -> float:
    """P(a random image of a has a higher likelihood, i.e. fewer bits/dim, than one of b), ties counted half."""
    return auroc(-np.asarray(bpd_a), -np.asarray(bpd_b))


def hist_rows(bpd: Mapping[str, Mapping[str, np.ndarray]], names: Mapping[str, str] | None = None) -> list[dict]:
    """Likelihood summary per lens and set (the paper's Fig. 2 in numbers).

    Arguments:
        bpd: lens → {"in", "ood", "generated"} → bits per dimension, shape (N,) each.
        names: Set role → displayed name (default :data:`SET_LABELS`).

    Returns:
        One row per (lens, set) with the keys of ``HIST_COLUMNS``: n, mean, median, 5th and 95th percentile of
        bits/dim, and the probability that an image of the set has a higher likelihood than one of the
        in-distribution test set (0.5 on its own row) and than one of the OOD set.
    """
    names = {**SET_LABELS, **(names or {})}
    rows = []
    for lens, sets in bpd.items():
        for role, values in sets.items():
            values = np.asarray(values, dtype=np.float64)
            p5, median, p95 = np.percentile(values, [5, 50, 95])
            rows.append({"lens": lens, "set": names[role], "n": len(values), "mean": float(values.mean()),
                         "median": float(median), "p5": float(p5), "p95": float(p95),
                         "above_in": _prob_higher(values, sets["in"]), "above_ood": _prob_higher(values, sets["ood"])})
    return rows


def _sample_grid(images: np.ndarray, side: int) -> np.ndarray:
    """The first side² images (N, 1, H, W) tiled into one (side·H, side·W) array (blank where fewer)."""
    n, _, h, w = images.shape
    tiles = np.zeros((side * side, h, w), dtype=np.float32)
    tiles[: min(n, side * side)] = images[: side * side, 0]
    return tiles.reshape(side, side, h, w).transpose(0, 2, 1, 3).reshape(side * h, side * w)


def plot_hist(bpd: Mapping[str, Mapping[str, np.ndarray]], samples: Mapping[str, np.ndarray], path: str | Path,
              names: Mapping[str, str] | None = None, side: int = 5) -> Path:
    """Top: bits/dim histograms of each set, one panel per lens (the paper's Fig. 2); bottom: the generated samples.

    Arguments:
        bpd: As for :func:`hist_rows`.
        samples: lens → generated images (N, 1, H, W) in [0, 1]; the first side² are shown.
        path: Output PNG.
        names: Set role → legend name.
        side: Samples per row and column of the grid.
    """
    names = {**SET_LABELS, **(names or {})}
    fig, axes = figure_grid(2, len(bpd), (4.6 * len(bpd), 7.4))
    for j, (lens, sets) in enumerate(bpd.items()):
        ax = axes[0, j]
        pooled = np.concatenate([np.asarray(v, dtype=np.float64) for v in sets.values()])
        edges = np.linspace(*np.percentile(pooled, [0.5, 99.5]), 41)
        for role, values in sets.items():
            values = np.clip(values, edges[0], edges[-1])
            density = np.histogram(values, bins=edges, density=True)[0]
            ax.stairs(density, edges, fill=True, alpha=0.3, color=_SET_COLORS.get(role))
            ax.stairs(density, edges, lw=1.4, color=_SET_COLORS.get(role),
                      label=f"{names[role]} (n={len(values)}, median {np.median(values):.2f})")
        ax.set(xlabel="bits per dimension (lower = more likely)", ylabel="density", title=f"{lens} lens")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        axes[1, j].imshow(_sample_grid(samples[lens], side), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[1, j].set_title(f"{lens}: first {side * side} generated samples", fontsize="medium")
        axes[1, j].axis("off")
    return save_png(fig, path)


# ----------------------------------------------------------------------------- dual-gen: FMNIST-gen vs MNIST


GEN_COLUMNS = {
    "lens": ("lens", ""), "task": ("task", ""), "n_in": ("n in", "d"), "n_ood": ("n OOD", "d"),
    "auroc_likelihood": ("AUROC likelihood", ".4f"), "auroc_lid": ("AUROC LID", ".4f"),
    "auroc_optimal_dual": ("AUROC optimal dual", ".4f"), "auroc_detector": ("AUROC dual detector", ".4f"),
}


def task_row(pairs_in: np.ndarray, pairs_ood: np.ndarray, pairs_fit: np.ndarray, acceptance: float = 0.95) -> dict:
    """AUROCs of one in-distribution vs OOD task from (log-likelihood, LID) pairs, higher = more in-distribution.

    Arguments:
        pairs_in, pairs_ood: Shapes (N, 2), (M, 2).
        pairs_fit: In-distribution training pairs (K, 2) that fit the deployable detector.
        acceptance: Training acceptance of the detector's thresholds.

    Returns:
        ``n_in``, ``n_ood``, ``auroc_likelihood`` and ``auroc_lid`` (each statistic alone), ``auroc_optimal_dual``
        (the best threshold pair at every FPR, :func:`dgmood.detectors.dual.optimal_roc_auc`, which looks at the OOD set) and
        ``auroc_detector`` (:class:`dgmood.detectors.dual.DualThresholdDetector` fitted on ``pairs_fit`` alone).
    """
    detector = DualThresholdDetector(acceptance=acceptance).fit(pairs_fit)
    return {"n_in": len(pairs_in), "n_ood": len(pairs_ood),
            "auroc_likelihood": auroc(pairs_in[:, 0], pairs_ood[:, 0]),
            "auroc_lid": auroc(pairs_in[:, 1], pairs_ood[:, 1]),
            "auroc_optimal_dual": optimal_roc_auc(pairs_in[:, 0], pairs_in[:, 1], pairs_ood[:, 0], pairs_ood[:, 1]),
            "auroc_detector": auroc(detector.score_samples(pairs_in), detector.score_samples(pairs_ood)),
            "thresholds": [float(t) for t in detector.thresholds_]}


def plot_gen(pairs: Mapping[str, Mapping[str, np.ndarray]], thresholds: Mapping[str, Sequence[float]],
             path: str | Path, names: Mapping[str, str] | None = None, seed: int = 0) -> Path:
    """Log-likelihood vs LID of the in-distribution test set, the samples and the OOD set, one panel per lens.

    Arguments:
        pairs: lens → set role → (N, 2) pairs (log-likelihood in nats, LID).
        thresholds: lens → the fitted (log-likelihood, LID) thresholds, drawn dashed.
        path: Output PNG.
        names: Set role → legend name.
        seed: Seed of the subsampling (at most 1000 points per set).
    """
    names = {**SET_LABELS, **(names or {})}
    rng = np.random.default_rng(seed)
    fig, axes = figure_grid(1, len(pairs), (4.8 * len(pairs), 4.4))
    for ax, (lens, sets) in zip(axes[0], pairs.items()):
        for role, p in sets.items():
            p = p if len(p) <= 1000 else p[rng.choice(len(p), 1000, replace=False)]
            ax.scatter(p[:, 0], p[:, 1], s=7, alpha=0.5, lw=0, color=_SET_COLORS.get(role),
                       label=f"{names[role]} (n={len(sets[role])})")
        ax.axvline(thresholds[lens][0], ls="--", lw=1, color="0.3")
        ax.axhline(thresholds[lens][1], ls="--", lw=1, color="0.3", label="thresholds (training data)")
        lo, hi = np.percentile(np.concatenate([p[:, 0] for p in sets.values()]), [1, 100])
        ax.set(xlim=(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)), xlabel="log-likelihood (nats)", ylabel="LID",
               title=f"{lens} lens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", markerscale=2)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- dual-ablation: calibrated vs fixed


ABLATION_COLUMNS = {
    "lens": ("lens", ""), "parameter": ("parameter", ""), "value": ("value", ".4g"), "factor": ("× calibrated", "g"),
    "mean_lid": ("mean LID (calibration points)", ".1f"), "target": ("LPCA target", ".1f"),
    "auroc_lid": ("AUROC LID", ".4f"), "auroc_optimal_dual": ("AUROC optimal dual", ".4f"),
    "auroc_detector": ("AUROC dual detector", ".4f"),
}


def ablation_rows(stats: LensStats, specs: Mapping[str, str], calibration: Mapping, factors: Sequence[float],
                  acceptance: float = 0.95, log: Callable[[str], None] | None = None) -> list[dict]:
    """AUROCs and mean LID with τ / σ₀ at ``factors`` × the calibrated value (the paper's App. C, Table 2).

    For each value v: the LID of the in-distribution, OOD and training-head sets at v (a flow's singular values
    are cached, so any τ is free; FLIPD is computed and cached per σ₀), then :func:`task_row`, and the mean LID
    over the run's calibration points, the quantity calibration matched to the LPCA target.

    Arguments:
        stats: The lens (e.g. from :func:`open_lens`).
        specs: Set names by role (``in``, ``ood``, ``fit``).
        calibration: The stored calibration (``parameter``, ``value``, ``target_lpca``).
        factors: Multiples of the calibrated value; 1 is the calibrated value itself.
        acceptance: Training acceptance of the detector.
        log: Called with one progress line per value.

    Returns:
        One row per factor with the keys of ``ABLATION_COLUMNS``.
    """
    rows, points = [], stats.calibration_set()
    for factor in factors:
        value = float(calibration["value"]) * float(factor)
        p = {role: stats.pairs(specs[role], value) for role in ("in", "ood", "fit")}
        row = {"lens": stats.config.lens.lens, "parameter": "σ₀" if calibration["parameter"] == "sigma0" else "τ",
               "value": value, "factor": float(factor), "mean_lid": float(stats.lid(points, value).mean()),
               "target": float(calibration["target_lpca"]), **task_row(p["in"], p["ood"], p["fit"], acceptance)}
        rows.append(row)
        if log is not None:
            log(f"{row['lens']} {row['parameter']}={value:.4g}: mean LID {row['mean_lid']:.1f}, "
                f"optimal dual {row['auroc_optimal_dual']:.4f}, detector {row['auroc_detector']:.4f}")
    return rows


def plot_ablation(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Per lens (columns): AUROCs against τ / σ₀ (top) and mean LID against the LPCA target (bottom), log axes;
    the dotted vertical line marks the calibrated value (factor 1)."""
    lenses = list(dict.fromkeys(r["lens"] for r in rows))
    fig, axes = figure_grid(2, len(lenses), (4.6 * len(lenses), 7.6))
    for j, lens in enumerate(lenses):
        part = sorted((r for r in rows if r["lens"] == lens), key=lambda r: r["value"])
        x = [r["value"] for r in part]
        calibrated = [r["value"] for r in part if r["factor"] == 1]
        for key, label, color in (("auroc_optimal_dual", "optimal dual", "k"),
                                  ("auroc_detector", "dual detector", "C0"), ("auroc_lid", "LID alone", "C1")):
            axes[0, j].plot(x, [r[key] for r in part], "o-", color=color, label=label)
        axes[1, j].plot(x, [r["mean_lid"] for r in part], "o-", color="C2", label="mean LID, calibration points")
        axes[1, j].axhline(part[0]["target"], ls="--", color="0.3", label=f"LPCA target {part[0]['target']:.1f}")
        for ax in axes[:, j]:
            for v in calibrated:
                ax.axvline(v, ls=":", color="0.5")
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        axes[0, j].set(ylabel="AUROC", title=f"{lens} lens", ylim=(-0.02, 1.02))
        axes[1, j].set(xlabel=part[0]["parameter"], ylabel="mean LID")
    return save_png(fig, path)


# ----------------------------------------------------------------------------- dual-scatter: the stored evaluation


SCATTER_COLUMNS = {
    "lens": ("lens", ""), "ood": ("OOD set", ""), "auroc_likelihood": ("AUROC likelihood", ".4f"),
    "auroc_lid": ("AUROC LID", ".4f"), "auroc_detector": ("AUROC dual detector", ".4f"),
    "auroc_optimal_dual": ("AUROC optimal dual", ".4f"),
}


def scatter_outputs(run_dir: Path, out: Path, progress: bool = False) -> tuple[list[dict], dict]:
    """Redraw a run's stored dual evaluation from its cached statistics into ``out``.

    Writes ``out/dual-scatter-LENS.png`` (:func:`dgmood.evaluation.report.plot_pairs`) and ``out/dual-roc-LENS.png``
    (:func:`dgmood.evaluation.report.plot_dual_roc`) for the sets of ``RUN/dual-LENS-LID/evaluation.json``.

    Returns:
        One row per OOD set with the keys of ``SCATTER_COLUMNS``, and the stored evaluation record.
    """
    from dgmood.evaluation import report

    run = Run(run_dir, progress=progress)
    config, _, evaluation = stored_dual(run)
    ev = evaluate_dual(run, config, evaluation["ood"], evaluation["in"])
    lens = config.lens.lens
    ood = {s: ev.pairs[s] for s in evaluation["ood"]}
    report.plot_pairs(ev.pairs[evaluation["in"]], ood, out / f"dual-scatter-{lens}.png",
                      thresholds=ev.calibration["thresholds"])
    report.plot_dual_roc(ev.pairs[evaluation["in"]], ood, ev.scores, out / f"dual-roc-{lens}.png")
    rows = [{"lens": lens, "ood": s, "auroc_likelihood": ev.results["likelihood"][s]["auroc"],
             "auroc_lid": ev.results["lid"][s]["auroc"], "auroc_detector": ev.results["dual-threshold"][s]["auroc"],
             "auroc_optimal_dual": ev.results["dual-threshold"][s]["auroc_optimal_dual"]} for s in evaluation["ood"]]
    return rows, evaluation
