"""The dual-threshold evaluation of a run (METHODS §3): calibrate the LID, fit the thresholds, score, report.

Steps, all from training data except the scoring itself:
1. target LID = mean LPCA over training images (cached in ``RUN/dual-LENS-LID/calibration.json``);
2. τ (flow Jacobian, normal bundle) or σ₀ (FLIPD) so that the lens's mean LID over 80 random training
   points equals the target;
3. a :class:`~dgmood.detectors.dual.DualThresholdDetector` on (log-likelihood, LID) of ``fit_n`` training images;
4. every method (dual threshold, likelihood alone, LID alone, the lens's baselines, input complexity) scored on
   the in-distribution test set and each OOD set; the optimal-ROC AUC of the pair added as ``auroc_optimal_dual``.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from dgmood.statistics.lens import LID_STATISTIC, LensConfig, StatCache, settings_dict

__all__ = ["DualConfig", "DualEvaluation", "calibration", "calibration_set_name", "evaluate_dual", "lid_from_sv",
           "write_dual_outputs"]


@dataclass(frozen=True)
class DualConfig:
    """Settings of :func:`evaluate_dual`.

    Attributes:
        lens: How log-likelihood and LID are computed.
        fit_n: Training images (the first ``fit_n``) whose statistics fit the thresholds.
        calibration_n: Random training points of the LID calibration (METHODS §3: 80).
        lpca_queries: Training points whose LPCA LID is averaged into the calibration target.
        lpca_pool: Training images LPCA's neighbours are searched in (the first ``lpca_pool``).
        lpca_neighbors: Neighbours k of LPCA (the paper: 1000).
        acceptance: In-distribution training acceptance of the fitted thresholds.
        background: Run directory of a background model (same kind, trained with ``--perturb``) for the
            likelihood-ratio baseline; empty for none.
    """

    lens: LensConfig = field(default_factory=LensConfig)
    fit_n: int = 500
    calibration_n: int = 80
    lpca_queries: int = 200
    lpca_pool: int = 10000
    lpca_neighbors: int = 1000
    acceptance: float = 0.95
    background: str = ""

    @property
    def name(self) -> str:
        return f"dual-{self.lens.lens}-{self.lens.lid}"


@dataclass
class DualEvaluation:
    """What :func:`evaluate_dual` returns.

    Attributes:
        results: method → OOD spec → metric → value (``METRIC_NAMES``; the dual method adds ``auroc_optimal_dual``).
        scores: method → {"in": (N,), "ood": {spec: (M,)}}, higher = more in-distribution.
        pairs: spec → (N, 2) array of (log-likelihood in nats, LID), the in-distribution spec included.
        calibration: the stored calibration (target LPCA, parameter, value, achieved mean LID).
        seconds_per_image: statistic → seconds per image when it was computed.
        directory: Where metrics, plots and report go.
        evaluation: The underlying :class:`~dgmood.evaluation.evaluate.Evaluation`.
    """

    results: dict
    scores: dict
    pairs: dict
    calibration: dict
    seconds_per_image: dict
    directory: Path
    evaluation: object = None


class _Stats:
    """Cached statistics of one run through one lens."""

    def __init__(self, run, config: DualConfig):
        self.run, self.config = run, config
        self.cache = StatCache(run.directory / "lens", run.model_sha)
        self.seconds: dict[str, float] = {}
        self.background = (_Stats(_background_run(run, config.background), replace(config, background=""))
                           if config.background else None)
        self._train = None

    @property
    def train(self) -> np.ndarray:
        """The run's training images (N, C, H, W), loaded once."""
        if self._train is None:
            self._train = self.run.images(self.run.config.data)
        return self._train

    def get(self, stat: str, spec: str, images_fn=None, **extra) -> np.ndarray:
        images_fn = images_fn or (lambda: self.run.images(spec))
        values, meta = self.cache.get(stat, self.config.lens, spec, images_fn, self.run.model, self.run.device,
                                      self.run.progress, **extra)
        self.seconds.setdefault(stat, meta.get("seconds_per_image", float("nan")))
        return values


def _background_run(run, directory: str):
    background = type(run)(Path(directory), run.device, run.data_dir, run.progress)
    if background.config.model != run.config.model or background.config.net.image_shape != run.config.net.image_shape:
        raise ValueError(f"background run {directory} holds a {background.config.model} model for images "
                         f"{tuple(background.config.net.image_shape)}; it must match {run.directory}")
    if background.config.train.perturb <= 0:
        raise ValueError(f"background run {directory} was not trained on perturbed images; train it with --perturb")
    return background


# --- calibration ---------------------------------------------------------------------------------------------


def calibration_set_name(data: str, n: int, seed: int) -> str:
    """The dataset name the LID calibration points' statistics are cached under."""
    return f"calibration:{data}:n{n}:seed{seed}"


def _calibration_images(stats: _Stats, config: DualConfig) -> tuple[str, np.ndarray]:
    from dgmood.statistics.calibrate import calibration_points

    data = stats.run.config.data
    idx = calibration_points(len(stats.train), config.calibration_n, seed=config.lens.seed)
    return calibration_set_name(data, config.calibration_n, config.lens.seed), stats.train[idx]


def _head(stats: _Stats, n: int) -> str:
    """The spec of the first ``n`` training images (all of them when there are fewer)."""
    from dgmood.data.datasets import head_spec

    return head_spec(stats.run.config.data, min(n, len(stats.train)))


def _target_lid(stats: _Stats, config: DualConfig) -> float:
    from dgmood.statistics.flipd import lpca_target

    return lpca_target(stats.train, config.lpca_pool, config.lpca_neighbors, config.lpca_queries, config.lens.seed)


def _calibrate(stats: _Stats, config: DualConfig, target: float) -> dict:
    """τ or σ₀ so that the mean LID over the calibration points matches ``target`` (METHODS §3)."""
    from dgmood.statistics import calibrate

    name, images = _calibration_images(stats, config)
    lens = config.lens
    if lens.lid == "flipd":
        from dgmood.statistics.flipd import calibrate_flipd

        return calibrate_flipd(stats.run.model, images, target, lens.probes, lens.seed, stats.run.device)
    sv = stats.get(LID_STATISTIC[lens.lid], name, lambda: images)
    dim = images[0].size
    tau = calibrate.calibrate_tau(sv, target, kind="flow" if lens.lid == "jacobian" else "normal_bundle", dim=dim)
    return {"parameter": "tau", "value": tau, "achieved": float(lid_from_sv(sv, tau, lens.lid, dim).mean())}


def lid_from_sv(sv: np.ndarray, tau: float, lid: str, dim: int) -> np.ndarray:
    """Flow: LID = #{s > τ}; normal bundle: LID = D − #{s > τ} (METHODS §3), shape (N,)."""
    above = (sv > tau).sum(axis=1).astype(np.float64)
    return above if lid == "jacobian" else dim - above


def calibration(run, config: DualConfig, stats: _Stats | None = None) -> dict:
    """The run's stored calibration for this lens and LID, computed (and stored) when missing or stale."""
    from dgmood.utils.files import write_json

    stats = stats or _Stats(run, config)
    path = run.directory / config.name / "calibration.json"
    key = {"model_sha256": run.model_sha, "lens": settings_dict(config.lens),
           "setup": {k: v for k, v in asdict(config).items() if k not in ("lens", "fit_n", "acceptance", "background")}}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored
    start = time.perf_counter()
    target = _target_lid(stats, config)
    result = dict(_calibrate(stats, config, target), target_lpca=target, key=key,
                  seconds=time.perf_counter() - start)
    write_json(path, result)
    return result


# --- scoring -------------------------------------------------------------------------------------------------


def _lid(stats: _Stats, spec: str, calib: dict) -> np.ndarray:
    lid = stats.config.lens.lid
    if lid == "flipd":
        return stats.get("flipd", spec, sigma0=calib["value"])
    dim = int(np.prod(stats.run.config.net.image_shape))
    return lid_from_sv(stats.get(LID_STATISTIC[lid], spec), calib["value"], lid, dim)


def _pair(stats: _Stats, spec: str, calib: dict) -> np.ndarray:
    return np.column_stack([stats.get("log_likelihood", spec), _lid(stats, spec, calib)])


def _reconstruction_score(errors: np.ndarray, train_errors: np.ndarray) -> np.ndarray:
    """Graham et al. (2023): each noise level's reconstruction error z-scored with training statistics, then
    averaged over levels; negated so that higher = more in-distribution. Shapes (N, L), (M, L) → (N,)."""
    mean, std = train_errors.mean(axis=0), train_errors.std(axis=0) + 1e-12
    return -((errors - mean) / std).mean(axis=1)


def _baselines(stats: _Stats, spec: str, pair: np.ndarray, fit_spec: str) -> dict[str, np.ndarray]:
    """Single-statistic scores, higher = more in-distribution."""
    from dgmood.models.flow import bits_per_dim

    dim = int(np.prod(stats.run.config.net.image_shape))
    bpd = bits_per_dim(pair[:, 0], dim)
    complexity = stats.get("complexity", spec)
    out = {"likelihood": pair[:, 0], "lid": pair[:, 1], "complexity-corrected": -(bpd - complexity)}
    if stats.background is not None:  # Ren et al. (2019): log p(x) − log p_background(x)
        out["likelihood-ratio"] = pair[:, 0] - stats.background.get("log_likelihood", spec)
    if stats.config.lens.lens == "flow":
        out["grad-norm"] = -stats.get("grad_norm", spec)
    else:
        out["score-norm"] = -stats.get("score_norm", spec)
        out["reconstruction"] = _reconstruction_score(stats.get("reconstruction", spec),
                                                      stats.get("reconstruction", fit_spec))
    return out


class _LensScores:
    """Every dual-threshold method as a detector of :func:`~dgmood.evaluation.evaluate.evaluate_detectors`: its
    ``statistic_values`` are one set's cached (log-likelihood, LID) pair and baseline scores (computed once per
    set and shared by the methods), its ``score_values`` pick the method's column."""

    def __init__(self, method: str, table: Callable[[str], dict[str, np.ndarray]]):
        self.method, self.table = method, table

    def statistic_values(self, images_fn, key: str) -> dict[str, np.ndarray]:
        return self.table(key)

    def score_values(self, values: dict[str, np.ndarray]) -> np.ndarray:
        return values[self.method]


def evaluate_dual(run, config: DualConfig, ood_specs: list[str], in_spec: str = "") -> DualEvaluation:
    """Calibrate, fit and score the dual-threshold method and its baselines on a run (see module docstring),
    through the one :func:`~dgmood.evaluation.evaluate.evaluate_detectors`."""
    from dgmood.detectors.dual import DualThresholdDetector, optimal_roc_auc
    from dgmood.evaluation.evaluate import check_sets, evaluate_detectors

    in_spec = in_spec or run.config.in_test
    check_sets(in_spec, ood_specs)
    if (run.config.model == "flow") != (config.lens.lens == "flow"):
        raise ValueError(f"the {config.lens.lens} lens needs a {'flow' if config.lens.lens == 'flow' else 'score'} "
                         f"model, but {run.directory} holds a {run.config.model} model")
    stats = _Stats(run, config)
    calib = calibration(run, config, stats)
    fit_spec = _head(stats, config.fit_n)
    pairs = {spec: _pair(stats, spec, calib) for spec in dict.fromkeys([fit_spec, in_spec, *ood_specs])}
    detector = DualThresholdDetector(acceptance=config.acceptance).fit(pairs[fit_spec])

    @functools.cache
    def table(spec: str) -> dict[str, np.ndarray]:
        return {"dual-threshold": detector.score_samples(pairs[spec]), **_baselines(stats, spec, pairs[spec], fit_spec)}

    methods = list(table(in_spec))
    images = {spec: (lambda s=spec: run.images(s)) for spec in [in_spec, *ood_specs]}  # read only for the galleries
    ev = evaluate_detectors({m: _LensScores(m, table) for m in methods}, (in_spec, images[in_spec]),
                            {spec: images[spec] for spec in ood_specs})
    for s in ood_specs:
        p_in, p_out = pairs[in_spec], pairs[s]
        ev.results["dual-threshold"][s]["auroc_optimal_dual"] = optimal_roc_auc(p_in[:, 0], p_in[:, 1], p_out[:, 0],
                                                                                p_out[:, 1])
    calib = dict(calib, thresholds=[float(t) for t in detector.thresholds_], level=float(detector.offset_),
                 fit_data=fit_spec)
    return DualEvaluation(ev.results, ev.scores, pairs, calib, dict(stats.seconds), run.directory / config.name, ev)


def _context(run, config: DualConfig, ev: DualEvaluation, in_spec: str, seconds: float) -> dict:
    calib, lens = ev.calibration, config.lens
    context = {
        "training set": run.config.data,
        "in-distribution test set": in_spec,
        "lens / LID estimator": f"{lens.lens} / {lens.lid}",
        "model sha256": run.model_sha[:16],
        "thresholds fitted on": f"{calib['fit_data']} (acceptance {config.acceptance:.0%})",
        "calibration target (mean LPCA)": f"{calib['target_lpca']:.1f} ({config.lpca_queries} queries, "
                                          f"k = {config.lpca_neighbors})",
        f"calibrated {calib['parameter']}": f"{calib['value']:.4g} (mean LID {calib['achieved']:.1f} on "
                                            f"{config.calibration_n} training points)",
        "thresholds (log-likelihood nats, LID)": ", ".join(f"{t:.4g}" for t in calib["thresholds"]),
    }
    if lens.lens == "diffusion":
        grid = f"tol {lens.tol:g}" if lens.solver == "adaptive" else f"{lens.steps} {lens.spacing} steps"
        context["PF-ODE"] = f"{lens.solver}, {grid}, t_eps {lens.t_eps:g}, {lens.probes} probes"
    for stat, s in ev.seconds_per_image.items():
        context[f"time per image: {stat}"] = f"{s * 1000:.1f} ms"
    context["evaluation time"] = f"{seconds:.1f} s"
    return context


def write_dual_outputs(run, config: DualConfig, ev: DualEvaluation, in_spec: str, seconds: float) -> str:
    """The one output step (:func:`~dgmood.evaluation.evaluate.write_evaluation`) with the pair scatter and the
    dual-threshold ROC added, in ``ev.directory``; returns the text table."""
    from dgmood.evaluation import report
    from dgmood.evaluation.evaluate import write_evaluation
    from dgmood.methods.explain import galleries

    out = ev.directory
    ood = {s: ev.pairs[s] for s in ev.evaluation.ood_names}
    plots = {
        "Log-likelihood vs LID, in-distribution vs each OOD set (dashed: fitted thresholds)": report.plot_pairs(
            ev.pairs[in_spec], ood, out / "plots" / "pairs.png", thresholds=ev.calibration["thresholds"]),
        "Dual-threshold ROC (optimal threshold pairs) vs single-threshold ROCs": report.plot_dual_roc(
            ev.pairs[in_spec], ood, ev.scores, out / "plots" / "dual_roc.png"),
    }
    return write_evaluation(out, ev.evaluation, _context(run, config, ev, in_spec, seconds),
                            f"dgmood dual-threshold report ({config.lens.lens} lens, {config.lens.lid} LID)",
                            "dual-threshold", {"lens": settings_dict(config.lens), "fit_n": config.fit_n,
                                               "calibration": ev.calibration,
                                               "seconds_per_image": ev.seconds_per_image}, plots=plots,
                            galleries=galleries(None, ev.evaluation, "dual-threshold", tiles=functools.partial(
                                _pair_tiles, ev), shows="image, with its log-likelihood and LID against the thresholds"))


def _pair_tiles(ev: DualEvaluation, name: str, images: np.ndarray, idx: np.ndarray) -> list[tuple[bytes, str]]:
    """Verdict tiles of the dual threshold: each image captioned with its score and which of (log-likelihood,
    LID) fell below its threshold."""
    from dgmood.evaluation.tiles import png_bytes, tile
    from dgmood.methods.explain import caption

    thresholds, level = ev.calibration["thresholds"], ev.calibration["level"]
    scores, pairs = ev.evaluation.scores["dual-threshold"], ev.pairs[name]
    score = scores["in"] if name == ev.evaluation.in_name else scores["ood"][name]
    out = []
    for image, i in zip(images, idx):
        below = [f"{label} {v:.4g} < {t:.4g}" for label, v, t in zip(("log-likelihood", "LID"), pairs[i], thresholds)
                 if v < t]
        lines = caption(float(score[i]), 1 if score[i] >= level else -1, level,
                        "; ".join(below) or "log-likelihood and LID both at or above their thresholds")
        out.append((png_bytes(tile(image, None, None, lines)), " | ".join(lines)))
    return out
