"""Evaluation reports: metric tables (text, markdown, JSON, CSV), ROC / histogram / embedding plots, report.md."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; set before any pyplot import anywhere in the process

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from dgmood.utils.files import atomic_write  # noqa: E402
from dgmood.evaluation.metrics import METRIC_NAMES, auroc, roc_curve  # noqa: E402

__all__ = [
    "embed_2d",
    "format_table",
    "metrics_table",
    "plot_dual_roc",
    "plot_embedding",
    "plot_histograms",
    "plot_score_histograms",
    "subsample",
    "plot_pairs",
    "plot_roc",
    "write_metrics",
    "write_report",
]

# Column headers for the human-readable tables, in METRIC_NAMES order.
_HEADERS = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-in",
    "aupr_out": "AUPR-out",
    "fpr_at_95_tpr": "FPR@95TPR",
    "fpr_at_80_tpr": "FPR@80TPR",
    "detection_error": "Det. error",
}
_PERCENT = {"fpr_at_95_tpr", "fpr_at_80_tpr", "detection_error"}
# Optional metrics some methods add (the dual threshold's optimal-ROC AUC); shown only when present.
_EXTRA = {"auroc_optimal_dual": "AUROC opt. dual"}
_MAX_POINTS = 2000

_EXPLANATION = (
    "Scores are higher = more in-distribution, and the in-distribution test set is the positive class. "
    "AUROC: probability that an in-distribution sample outscores an OOD one (0.5 = chance). "
    "AUPR-in / AUPR-out: average precision with the in-distribution / OOD set as the positive class. "
    "FPR@95TPR / FPR@80TPR: fraction of OOD samples still accepted at the threshold that keeps 95% / 80% "
    "of the in-distribution test set (lower is better). "
    "Det. error: min over thresholds of 0.5·(1 − TPR) + 0.5·FPR (lower is better)."
)


# ----------------------------------------------------------------------------- tables


def metrics_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict]:
    """Flatten detector → OOD set → metrics into one row per (detector, OOD set).

    Args:
        results: ``results[detector][ood][metric]`` for every metric in ``METRIC_NAMES``
            (extra keys are ignored, except the optional ones of ``_EXTRA``).

    Returns:
        Rows ``{"detector", "ood", *METRIC_NAMES}`` (plus any ``_EXTRA`` key given) with plain float
        metrics, in the input order.

    Raises:
        KeyError: A metric of ``METRIC_NAMES`` is missing.
    """
    rows = []
    for detector, per_ood in results.items():
        for ood, metrics in per_ood.items():
            missing = [m for m in METRIC_NAMES if m not in metrics]
            if missing:
                raise KeyError(f"{detector}/{ood}: missing metrics {missing}")
            rows.append({"detector": str(detector), "ood": str(ood),
                         **{m: float(metrics[m]) for m in [*METRIC_NAMES, *_EXTRA] if m in metrics}})
    return rows


def _format_metric(name: str, value: float) -> str:
    """AUROC/AUPR as ``0.xxxx``; FPRs and detection error as a percentage with one decimal."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%" if name in _PERCENT else f"{value:.4f}"


def _metric_columns(rows: Sequence[Mapping]) -> list[str]:
    """``METRIC_NAMES`` plus the optional metrics that any row has."""
    return [*METRIC_NAMES, *(m for m in _EXTRA if any(m in r for r in rows))]


def _table_cells(rows: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted body cells of the metrics table."""
    columns = _metric_columns(rows)
    header = ["Detector", "OOD set", *({**_HEADERS, **_EXTRA}[m] for m in columns)]
    body = [[str(r["detector"]), str(r["ood"]), *(_format_metric(m, r.get(m, float("nan"))) for m in columns)]
            for r in rows]
    return header, body


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> list[str]:
    """Left-align the two name columns, right-align the metric columns."""
    return [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]


def _md_escape(text: str) -> str:
    """Make ``text`` safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping], fmt: str = "text") -> str:
    """Render metric rows as an aligned table.

    Args:
        rows: Output of :func:`metrics_table`.
        fmt: ``"text"`` (terminal, space separated with a dashed rule) or ``"markdown"`` (GitHub table).

    Returns:
        The table, lines joined by newlines, no trailing newline.

    Raises:
        ValueError: Unknown ``fmt``.
    """
    if fmt not in ("text", "markdown"):
        raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
    header, body = _table_cells(rows)
    if fmt == "markdown":
        body = [[_md_escape(c) for c in line] for line in body]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    if fmt == "text":
        lines = [_aligned(header, widths), ["-" * w for w in widths], *(_aligned(b, widths) for b in body)]
        return "\n".join("  ".join(line).rstrip() for line in lines)
    rule = [("-" * w if i < 2 else "-" * (w - 1) + ":") for i, w in enumerate(widths)]
    lines = [_aligned(header, widths), rule, *(_aligned(b, widths) for b in body)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


# ----------------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _csv_text(rows: Sequence[Mapping]) -> str:
    """Rows as CSV with columns ``detector,ood,*METRIC_NAMES`` (and optional metrics any row has); floats in
    round-trip ``repr`` form, empty cells for a missing optional metric."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["detector", "ood", *_metric_columns(rows)], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r.get(k, "") for k in writer.fieldnames} for r in rows)
    return buf.getvalue()


def write_metrics(run_dir: str | Path, results: Mapping) -> tuple[Path, Path]:
    """Atomically write ``metrics.json`` and ``metrics.csv`` into ``run_dir``.

    Args:
        run_dir: Output directory (created if needed).
        results: ``results[detector][ood][metric]`` as for :func:`metrics_table`.

    Returns:
        ``(json_path, csv_path)``. The JSON is exactly detector → OOD set → the six ``METRIC_NAMES``
        as plain floats; the CSV has one row per (detector, OOD set).
    """
    run_dir = Path(run_dir)
    rows = metrics_table(results)
    nested: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        nested.setdefault(r["detector"], {})[r["ood"]] = {m: r[m] for m in [*METRIC_NAMES, *_EXTRA] if m in r}
    json_path = _atomic_write_text(run_dir / "metrics.json", json.dumps(nested, indent=2) + "\n")
    csv_path = _atomic_write_text(run_dir / "metrics.csv", _csv_text(rows))
    return json_path, csv_path


# ----------------------------------------------------------------------------- plotting helpers


def _new_figure(n_panels: int, max_cols: int, panel_size: tuple[float, float]) -> tuple[Figure, list]:
    """An Agg figure with a grid of ``n_panels`` axes (unused grid cells removed)."""
    ncols = min(n_panels, max_cols)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _save_png(fig: Figure, path: str | Path) -> Path:
    """Atomically save ``fig`` as a PNG at ``path``."""
    return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))


def _ood_names(scores: Mapping) -> list[str]:
    """OOD set names over all detectors, in order of first appearance."""
    names: dict[str, None] = {}
    for entry in scores.values():
        names.update(dict.fromkeys(entry["ood"]))
    return list(names)


def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` rows of ``x``, drawn without replacement."""
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


# ----------------------------------------------------------------------------- ROC


def plot_roc(scores: Mapping[str, Mapping], path: str | Path) -> Path:
    """ROC curves, one panel per OOD set and one curve per detector (AUROC in the legend).

    Args:
        scores: ``{detector: {"in": (n_in,) array, "ood": {ood_name: (n_ood,) array}}}``, higher =
            more in-distribution. A detector may lack some OOD sets.
        path: Output PNG path.

    Returns:
        ``path`` as a Path.
    """
    oods = _ood_names(scores)
    fig, axes = _new_figure(len(oods), 3, (4.2, 4.2))
    colors = {det: f"C{i % 10}" for i, det in enumerate(scores)}
    for ax, ood in zip(axes, oods):
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="chance")
        for det, entry in scores.items():
            if ood in entry["ood"]:
                fpr, tpr = roc_curve(entry["in"], entry["ood"][ood])
                value = auroc(entry["in"], entry["ood"][ood])
                ax.plot(fpr, tpr, color=colors[det], lw=1.6, label=f"{det} (AUROC {value:.4f})")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=f"in-dist. vs {ood}")
        ax.set(xlabel="FPR (OOD accepted)", ylabel="TPR (in-dist. accepted)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    return _save_png(fig, path)


# ----------------------------------------------------------------------------- histograms


def _shared_bins(values: Sequence[np.ndarray], n_bins: int = 50) -> tuple[np.ndarray, bool]:
    """Bin edges from the pooled finite values; log-spaced when positive and spanning > 2 decades."""
    pooled = np.concatenate([v[np.isfinite(v)] for v in values])
    if pooled.size == 0:
        return np.linspace(0.0, 1.0, n_bins + 1), False
    lo, hi = float(pooled.min()), float(pooled.max())
    if lo > 0 and hi / lo > 100:
        return np.geomspace(lo, hi, n_bins + 1), True
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1), False


def _density(values: np.ndarray, edges: np.ndarray, log: bool) -> np.ndarray:
    """Histogram density; per log10 unit when ``log`` so areas read correctly on a log axis."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(len(edges) - 1)
    if log:
        return np.histogram(np.log10(values), bins=np.log10(edges), density=True)[0]
    return np.histogram(values, bins=edges, density=True)[0]


def _check_features(features_in: np.ndarray, features_ood: Mapping[str, np.ndarray], n_cols: int) -> None:
    """Raise ValueError unless every feature matrix is 2-D with ``n_cols`` columns."""
    for name, x in {"in-distribution": features_in, **features_ood}.items():
        if np.ndim(x) != 2 or np.shape(x)[1] != n_cols:
            raise ValueError(f"{name} features must have shape (N, {n_cols}), got {np.shape(x)}")


def plot_score_histograms(scores_in: np.ndarray, scores_ood: Mapping[str, np.ndarray], path: str | Path,
                          label: str = "score (higher = more in-distribution)") -> Path:
    """One detector's scores, in-distribution vs each OOD set: one panel per OOD set, density histograms.

    Args:
        scores_in: In-distribution test scores, shape (N,).
        scores_ood: OOD set name → scores, shape (M,).
        path: Output PNG path.
        label: x-axis label.

    Returns:
        ``path`` as a Path.
    """
    fig, axes = _new_figure(len(scores_ood), 3, (4.2, 3.2))
    for ax, (name, ood) in zip(axes, scores_ood.items()):
        finite = [v[np.isfinite(v)] for v in (np.asarray(scores_in), np.asarray(ood))]
        lo = np.quantile(np.concatenate(finite), 0.001)  # a few far outliers would squash the panel
        edges, _ = _shared_bins([np.maximum(v, lo) for v in finite])
        for values, what, color in zip(finite, ("in-distribution", name), ("C0", "C3")):
            ax.stairs(_density(np.maximum(values, lo), edges, False), edges, fill=True, alpha=0.45, color=color,
                      label=what)
        ax.set(xlabel=label, ylabel="density", title=f"in-dist. vs {name}")
        ax.legend(fontsize="small")
    return _save_png(fig, path)


def plot_histograms(
    features_in: np.ndarray,
    features_ood: Mapping[str, np.ndarray],
    sigmas: Sequence[float],
    path: str | Path,
) -> Path:
    """Per-σ histograms of score norms, in-distribution vs each OOD set (MSMA Fig. 1a).

    One panel per σ; overlaid density histograms on bins shared within the panel (computed from the
    pooled values), log-scaled x when the pooled range spans more than two decades (the density is
    then per log10 unit).

    Args:
        features_in: In-distribution test features, shape (N, L).
        features_ood: OOD set name → features, shape (M, L).
        sigmas: The L noise levels; column i belongs to ``sigmas[i]``.
        path: Output PNG path.

    Returns:
        ``path`` as a Path.
    """
    sigmas = np.asarray(sigmas, dtype=float).ravel()
    _check_features(features_in, features_ood, len(sigmas))
    sets = {"in-dist. test": features_in, **features_ood}
    sets = {name: np.asarray(x, dtype=np.float64) for name, x in sets.items()}
    fig, axes = _new_figure(len(sigmas), 4, (3.4, 2.7))
    for i, (ax, sigma) in enumerate(zip(axes, sigmas)):
        edges, log = _shared_bins([x[:, i] for x in sets.values()])
        for j, (name, x) in enumerate(sets.items()):
            density = _density(x[:, i], edges, log)
            ax.stairs(density, edges, fill=True, alpha=0.15, color=f"C{j % 10}")
            ax.stairs(density, edges, lw=1.4, color=f"C{j % 10}", label=name if i == 0 else None)
        if log:
            ax.set_xscale("log")
        ax.set_title(f"σ = {sigma:.3g}", fontsize="medium")
        ax.set_xlabel("‖σ·s(x, σ)‖₂", fontsize="small")
        ax.set_ylabel("density / log₁₀ unit" if log else "density", fontsize="small")
        ax.tick_params(labelsize="small")
    fig.legend(loc="outside upper center", ncols=min(len(sets), 5), frameon=False)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------- embedding


def _fit_embedding(train: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """Fit log → standardise → PCA(2) on ``train`` only; return the transform and explained-variance ratios."""
    from sklearn.decomposition import PCA

    train = np.asarray(train, dtype=np.float64)
    if train.ndim != 2 or train.shape[1] < 2 or train.shape[0] < 2:
        raise ValueError(f"training features must have shape (N >= 2, L >= 2), got {train.shape}")
    tiny = np.finfo(np.float64).tiny

    def log(x: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(np.asarray(x, dtype=np.float64), tiny))

    mean, std = log(train).mean(axis=0), log(train).std(axis=0)
    std = np.where(std > 0, std, 1.0)
    pca = PCA(n_components=2, svd_solver="full").fit((log(train) - mean) / std)

    def transform(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != train.shape[1]:
            raise ValueError(f"features must have shape (N, {train.shape[1]}), got {x.shape}")
        return pca.transform((log(x) - mean) / std)

    return transform, pca.explained_variance_ratio_


def embed_2d(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """2-D embedding of positive score-norm features, fitted on ``train`` only.

    log(features) → standardise with the training mean/std → PCA to 2 components fitted on the
    training features; ``others`` are only transformed, never used for fitting.

    Args:
        train: Training features, shape (N, L), L >= 2, positive (non-positive values are clipped).
        *others: Further feature matrices, shape (M_k, L).

    Returns:
        ``[train_2d, *others_2d]``, each of shape (rows, 2).
    """
    transform, _ = _fit_embedding(train)
    return [transform(x) for x in (train, *others)]


def plot_embedding(
    features_train: np.ndarray,
    features_in: np.ndarray,
    features_ood: Mapping[str, np.ndarray],
    path: str | Path,
    seed: int = 0,
) -> Path:
    """Scatter of the in-distribution test set and each OOD set in a 2-D view of score-norm space (MSMA Fig. 1b).

    The projection is :func:`embed_2d` (log, standardise, PCA fitted on ``features_train`` only);
    each set is subsampled to at most 2000 points.

    Args:
        features_train: Training features, shape (N, L).
        features_in: In-distribution test features, shape (N_in, L).
        features_ood: OOD set name → features, shape (M, L).
        path: Output PNG path.
        seed: Seed of the subsampling.

    Returns:
        ``path`` as a Path.
    """
    transform, ratio = _fit_embedding(features_train)
    rng = np.random.default_rng(seed)
    sets = {"in-dist. test": features_in, **features_ood}
    points = [transform(subsample(np.asarray(x), _MAX_POINTS, rng)) for x in sets.values()]
    colors = np.concatenate([np.full(len(z), j % 10) for j, z in enumerate(points)])
    order = rng.permutation(len(colors))  # interleave the sets so none is systematically hidden
    z = np.concatenate(points)[order]
    fig, (ax,) = _new_figure(1, 1, (6.4, 5.2))
    ax.scatter(z[:, 0], z[:, 1], s=5, alpha=0.35, lw=0, c=[f"C{c}" for c in colors[order]])
    handles = [Line2D([], [], ls="", marker="o", color=f"C{j % 10}", label=f"{name} (n={len(x)})")
               for j, (name, x) in enumerate(sets.items())]
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.set(xlabel=f"PC1 ({100 * ratio[0]:.0f}% of train variance)", ylabel=f"PC2 ({100 * ratio[1]:.0f}%)")
    ax.set_title("Score-norm space (log, standardised), PCA fitted on training features", fontsize="medium")
    ax.grid(alpha=0.3)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------- dual threshold


def plot_pairs(pairs_in: np.ndarray, pairs_ood: Mapping[str, np.ndarray], path: str | Path,
               thresholds: Sequence[float] | None = None, seed: int = 0) -> Path:
    """Likelihood-vs-LID scatter (the dual-threshold paper's Fig. 1 view), one panel per OOD set.

    Args:
        pairs_in: In-distribution test (log-likelihood in nats, LID), shape (N, 2).
        pairs_ood: OOD set name → pairs of shape (M, 2).
        path: Output PNG path.
        thresholds: The fitted (likelihood, LID) thresholds, drawn as dashed lines when given.
        seed: Seed of the subsampling (at most 2000 points per set).
    """
    rng = np.random.default_rng(seed)
    fig, axes = _new_figure(len(pairs_ood), 3, (4.6, 4.2))
    inside = subsample(np.asarray(pairs_in), _MAX_POINTS, rng)
    for ax, (name, pairs) in zip(axes, pairs_ood.items()):
        out = subsample(np.asarray(pairs), _MAX_POINTS, rng)
        ax.scatter(inside[:, 0], inside[:, 1], s=5, alpha=0.4, lw=0, color="C0", label=f"in-dist. (n={len(pairs_in)})")
        ax.scatter(out[:, 0], out[:, 1], s=5, alpha=0.4, lw=0, color="C3", label=f"{name} (n={len(pairs)})")
        if thresholds is not None:
            ax.axvline(thresholds[0], ls="--", lw=1, color="0.3")
            ax.axhline(thresholds[1], ls="--", lw=1, color="0.3", label="fitted thresholds")
        lo, hi = np.percentile(np.concatenate([inside[:, 0], out[:, 0]]), [0.5, 100])
        ax.set(xlim=(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)), xlabel="log-likelihood (nats)", ylabel="LID",
               title=f"in-dist. vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best", markerscale=3)
    return _save_png(fig, path)


def plot_dual_roc(pairs_in: np.ndarray, pairs_ood: Mapping[str, np.ndarray], scores: Mapping[str, Mapping],
                  path: str | Path, single: Sequence[str] = ("likelihood", "dual-threshold")) -> Path:
    """The dual-threshold ROC (Pareto frontier over all threshold pairs) beside single-threshold ROCs.

    Args:
        pairs_in, pairs_ood: As for :func:`plot_pairs`, higher = more in-distribution in both columns.
        scores: ``{method: {"in": (N,), "ood": {name: (M,)}}}`` as for :func:`plot_roc`.
        path: Output PNG path.
        single: Methods of ``scores`` drawn as single-threshold ROCs.
    """
    from dgmood.detectors.dual import optimal_roc_auc, optimal_roc_curve

    fig, axes = _new_figure(len(pairs_ood), 3, (4.2, 4.2))
    for ax, (name, pairs) in zip(axes, pairs_ood.items()):
        args = (pairs_in[:, 0], pairs_in[:, 1], pairs[:, 0], pairs[:, 1])
        fpr, tpr = optimal_roc_curve(*args)
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="chance")
        ax.plot(fpr, tpr, color="k", lw=1.8, label=f"optimal dual thresholds ({optimal_roc_auc(*args):.4f})")
        for i, method in enumerate(m for m in single if m in scores):
            s_in, s_out = scores[method]["in"], scores[method]["ood"][name]
            f, t = roc_curve(s_in, s_out)
            ax.plot(f, t, color=f"C{i}", lw=1.4, label=f"{method} ({auroc(s_in, s_out):.4f})")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=f"in-dist. vs {name}",
               xlabel="FPR (OOD accepted)", ylabel="TPR (in-dist. accepted)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    return _save_png(fig, path)


# ----------------------------------------------------------------------------- report.md


def _context_value(value) -> str:
    """Readable one-line rendering of a context value (floats: 4 significant digits, or 1 decimal from 1000 up)."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.1f}" if 1e3 <= abs(value) < 1e12 else f"{float(value):.4g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_context_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_context_value(v) for v in np.asarray(value, dtype=object).ravel().tolist())
    return str(value)


def _context_table(context: Mapping) -> str:
    """Two-column markdown table of the run context."""
    lines = ["| Key | Value |", "| --- | --- |"]
    lines += [f"| {_md_escape(k)} | {_md_escape(_context_value(v))} |" for k, v in context.items()]
    return "\n".join(lines)


def _plots_section(run_dir: Path, plots: Mapping[str, str | Path]) -> str:
    """Markdown image links, paths relative to ``run_dir``."""
    parts = []
    for name, p in plots.items():
        rel = Path(os.path.relpath(Path(p).resolve(), run_dir.resolve())).as_posix()
        parts.append(f"### {name}\n\n![{name}]({rel})")
    return "\n\n".join(parts)


def write_report(
    run_dir: str | Path,
    rows: Sequence[Mapping],
    plots: Mapping[str, str | Path],
    context: Mapping,
    title: str = "dgmood OOD evaluation report",
    galleries: Sequence = (),
) -> Path:
    """Atomically write ``run_dir/report.md`` (context table, metrics table, embedded plots, metric legend) and
    the self-contained ``run_dir/report.html`` (the same, plots inlined, plus the image ``galleries``:
    :mod:`dgmood.evaluation.html_report`).

    Args:
        run_dir: Run directory; plot links are made relative to it.
        rows: Output of :func:`metrics_table`.
        plots: Caption → PNG path (absolute, or relative to the current directory).
        context: Anything worth recording (training set, model checksum, σ grid, steps, throughput…),
            rendered as a two-column table in insertion order.
        title: First-level heading.
        galleries: Image galleries of report.html (:data:`dgmood.evaluation.html_report.Gallery`).

    Returns:
        The path of ``report.md``.
    """
    from dgmood.evaluation.html_report import write_html

    run_dir = Path(run_dir)
    sections = [f"# {title}"]
    if context:
        sections += ["## Context", _context_table(context)]
    sections += ["## Metrics", format_table(rows, "markdown"), _EXPLANATION]
    if plots:
        sections += ["## Plots", _plots_section(run_dir, plots)]
    write_html(run_dir / "report.html", title, context, rows, plots, galleries)
    return _atomic_write_text(run_dir / "report.md", "\n\n".join(sections) + "\n")
