"""Reproduction of MSMA's findings (Mahmood et al., ICLR 2021): the tables and figures of docs/reproduction.md.

Every table function returns rows (dicts with the keys of its ``*_COLUMNS``) computed from arrays it
is given, so it runs on synthetic inputs as well as on a run's cached features; every plot function
writes one PNG. ``benchmarks/reproduce.py`` wires them to a run directory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; before any pyplot import

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dgmood.detectors.estimators import DETECTORS, KNNDetector  # noqa: E402
from dgmood.utils.files import atomic_write  # noqa: E402
from dgmood.evaluation.metrics import aupr_in, auroc, fpr_at_tpr, roc_curve  # noqa: E402
from dgmood.models.noise import geometric_sigmas  # noqa: E402
from dgmood.evaluation.report import embed_2d, subsample  # noqa: E402
from dgmood.data.toy import (MSMA_TOY_MEANS, MSMA_TOY_POINTS, MSMA_TOY_SIGMAS, MSMA_TOY_STDS,  # noqa: E402
                  MSMA_TOY_WEIGHTS, smoothed_mixture_log_density, smoothed_mixture_score_norm)

__all__ = [
    "FIG1_COLUMNS", "FIG5_COLUMNS", "MSMA_TABLE14", "TABLE14_COLUMNS", "fig1_table", "fig5_grids", "fig5_table",
    "figure_grid", "markdown_table", "plot_fig1", "plot_fig5", "plot_table14", "plot_toy", "save_png", "table14", "toy_columns",
    "toy_table",
]

_DPI = 90
_MAX_POINTS = 2000

# ----------------------------------------------------------------------------- shared helpers


def markdown_table(rows: Sequence[Mapping], columns: Mapping[str, tuple[str, str]]) -> str:
    """Rows as a GitHub markdown table.

    Arguments:
        rows: Dicts holding every key of ``columns``.
        columns: key → (header, format spec such as ``".4f"`` or ``""`` for str()); NaN renders as ``n/a``.

    Returns:
        The table, lines joined by newlines, no trailing newline; text columns left-aligned, numbers right.
    """
    def cell(value, fmt: str) -> str:
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a"
        return format(value, fmt) if fmt else str(value)

    numeric = [bool(fmt) for _, fmt in columns.values()]
    body = [[cell(r[k], fmt).replace("|", "\\|") for k, (_, fmt) in columns.items()] for r in rows]
    header = [h for h, _ in columns.values()]
    rule = ["---:" if n else "---" for n in numeric]
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, rule, *body])


def figure_grid(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """An Agg figure of ``size`` inches with an (nrows, ncols) array of axes."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))


def save_png(fig: Figure, path: str | Path) -> Path:
    """Atomically save ``fig`` as a modest-dpi PNG (committed figures stay well under 200 KB)."""
    return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=_DPI))


def _check_features(**arrays: np.ndarray) -> int:
    """Raise unless all arrays are 2-D, non-empty, finite and share their column count; returns it."""
    widths = set()
    for name, x in arrays.items():
        if np.ndim(x) != 2 or len(x) == 0 or not np.all(np.isfinite(x)):
            raise ValueError(f"{name} features must be a finite, non-empty (N, L) array, got shape {np.shape(x)}")
        widths.add(np.shape(x)[1])
    if len(widths) != 1:
        raise ValueError(f"feature matrices disagree on their number of columns: {sorted(widths)}")
    return widths.pop()


# ----------------------------------------------------------------------------- MSMA Fig. 1


FIG1_COLUMNS = {
    "features": ("features", ""),
    "auroc_norm": ("AUROC, smaller norm = in", ".4f"),
    "auroc_knn": ("AUROC, 5-NN fitted on training features", ".4f"),
}


def _knn_auroc(train: np.ndarray, test_in: np.ndarray, test_ood: np.ndarray) -> float:
    det = KNNDetector().fit(train)
    return auroc(det.score_samples(test_in), det.score_samples(test_ood))


def fig1_table(train: np.ndarray, test_in: np.ndarray, test_ood: np.ndarray, sigmas) -> list[dict]:
    """Single-σ features against the whole score-norm vector (MSMA Fig. 1: one σ fails, L of them separate).

    One row per σ, that score norm alone: AUROC of the fixed rule "smaller norm = more in-distribution"
    and of a 1-D 5-NN detector fitted on the training column; then one row for the 5-NN detector on
    all L columns. No OOD data is used to fit or orient anything.

    Arguments:
        train, test_in, test_ood: Score-norm features, shapes (N, L), (N_in, L), (N_ood, L).
        sigmas: The L noise levels (pixel scale); column i belongs to sigmas[i].

    Returns:
        L + 1 rows with the keys of ``FIG1_COLUMNS`` plus ``sigma`` (NaN on the last row).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64).ravel()
    if _check_features(train=train, test_in=test_in, test_ood=test_ood) != len(sigmas):
        raise ValueError(f"features have {np.shape(train)[1]} columns but {len(sigmas)} sigmas were given")
    rows = [{"features": f"σ = {s:.3g} alone", "sigma": float(s),
             "auroc_norm": auroc(-test_in[:, i], -test_ood[:, i]),
             "auroc_knn": _knn_auroc(train[:, [i]], test_in[:, [i]], test_ood[:, [i]])}
            for i, s in enumerate(sigmas)]
    rows.append({"features": f"all {len(sigmas)} σ (5-NN)", "sigma": float("nan"), "auroc_norm": float("nan"),
                 "auroc_knn": _knn_auroc(train, test_in, test_ood)})
    return rows


def _histogram_panel(ax, values_in: np.ndarray, values_ood: np.ndarray, ood_name: str, title: str) -> None:
    edges = np.histogram_bin_edges(np.concatenate([values_in, values_ood]), bins=60)
    for j, (name, v) in enumerate((("in-dist. test", values_in), (ood_name, values_ood))):
        ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.25, color=f"C{j}")
        ax.hist(v, bins=edges, density=True, histtype="step", lw=1.3, color=f"C{j}", label=f"{name} (n={len(v)})")
    ax.set(title=title, xlabel="‖σ·s(x, σ)‖₂", ylabel="density")
    ax.legend(fontsize="small")


def plot_fig1(train: np.ndarray, test_in: np.ndarray, test_ood: np.ndarray, sigmas, path: str | Path,
              ood_name: str = "OOD", seed: int = 0) -> Path:
    """MSMA Fig. 1: score-norm histograms at the lowest and highest σ, and a 2-D view of all L.

    Arguments:
        train, test_in, test_ood: Features as for :func:`fig1_table`.
        sigmas: The L noise levels.
        path: Output PNG.
        ood_name: Legend name of the OOD set.
        seed: Seed of the subsampling (at most 2000 points per set in the scatter).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64).ravel()
    lo, hi = int(np.argmin(sigmas)), int(np.argmax(sigmas))
    fig, axes = figure_grid(1, 3, (15.0, 4.4))
    for ax, i, tag in ((axes[0, 0], lo, "lowest"), (axes[0, 1], hi, "highest")):
        a = auroc(-test_in[:, i], -test_ood[:, i])
        _histogram_panel(ax, test_in[:, i], test_ood[:, i], ood_name,
                         f"{tag} σ = {sigmas[i]:.3g} alone: AUROC {a:.3f}")
    rng = np.random.default_rng(seed)
    _, z_in, z_ood = embed_2d(train, subsample(test_in, _MAX_POINTS, rng), subsample(test_ood, _MAX_POINTS, rng))
    ax = axes[0, 2]
    ax.scatter(z_in[:, 0], z_in[:, 1], s=4, lw=0, alpha=0.4, color="C0", label="in-dist. test")
    ax.scatter(z_ood[:, 0], z_ood[:, 1], s=4, lw=0, alpha=0.4, color="C1", label=ood_name)
    knn = _knn_auroc(train, test_in, test_ood)
    ax.set(title=f"all {len(sigmas)} σ (log, standardised, PCA): 5-NN AUROC {knn:.3f}", xlabel="PC1", ylabel="PC2")
    ax.legend(fontsize="small", markerscale=3)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- MSMA Figs. 2-3 (1-D toy)


def toy_columns(sigmas=MSMA_TOY_SIGMAS) -> dict[str, tuple[str, str]]:
    """Columns of :func:`toy_table`: the point, x, log p(x) and |σ ∂ₓ log p_σ(x)| per σ."""
    return {"point": ("point", ""), "x": ("x", ".0f"), "log_density": ("log p(x)", ".2f"),
            **{f"score_norm@sigma={s:g}": (f"‖σ s‖ at σ = {s:g}", ".3g") for s in np.asarray(sigmas)}}


def toy_table(points: Mapping[str, float] = MSMA_TOY_POINTS, sigmas=MSMA_TOY_SIGMAS) -> list[dict]:
    """Analytic score norms |σ ∂ₓ log p_σ(x)| of the toy mixture at the discussed points (MSMA Fig. 3).

    Arguments:
        points: Name → x.
        sigmas: Noise levels (units of x).

    Returns:
        One row per point with the keys of ``toy_columns(sigmas)``; log p is the unsmoothed density.
    """
    return [{"point": name, "x": float(x), "log_density": float(smoothed_mixture_log_density(x, 0.0)),
             **{f"score_norm@sigma={s:g}": float(smoothed_mixture_score_norm(x, s)) for s in np.asarray(sigmas)}}
            for name, x in points.items()]


def plot_toy(path: str | Path, sigmas=MSMA_TOY_SIGMAS, points: Mapping[str, float] = MSMA_TOY_POINTS,
             x=None) -> Path:
    """MSMA Figs. 2-3: smoothed toy densities p_σ (top), score norms |σ ∂ₓ log p_σ| (bottom), one column per σ.

    Arguments:
        path: Output PNG.
        sigmas: Noise levels (units of x).
        points: Name → x, marked in every panel.
        x: Evaluation grid, shape (M,); default 1601 points on [-10, 70].
    """
    x = np.linspace(-10.0, 70.0, 1601) if x is None else np.asarray(x, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    fig, axes = figure_grid(2, len(sigmas), (4.2 * len(sigmas), 6.0))
    marks = np.array(list(points.values()), dtype=np.float64)
    for j, s in enumerate(sigmas):
        density = np.exp(smoothed_mixture_log_density(x, s))
        norm = smoothed_mixture_score_norm(x, s)
        axes[0, j].plot(x, density, color="k", lw=1.3)
        axes[0, j].set(title=f"p_σ(x), σ = {s:g}", xlabel="x")
        axes[1, j].plot(x, norm, color="k", lw=1.3)
        axes[1, j].set(title=f"|σ ∂ₓ log p_σ(x)|, σ = {s:g}", xlabel="x")
        for k, (name, m) in enumerate(points.items()):
            axes[0, j].plot(m, np.exp(smoothed_mixture_log_density(m, s)), "o", color=f"C{k}", label=f"{name} ({m:g})")
            axes[1, j].plot(m, smoothed_mixture_score_norm(m, s), "o", color=f"C{k}")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.set_xlim(x[0], x[-1])
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(f"1-D toy: {_toy_label()}; marks at x = {', '.join(f'{m:g}' for m in marks)}", fontsize="medium")
    return save_png(fig, path)


def _toy_label() -> str:
    return " + ".join(f"{w:g}·N({m:g}, {s:g}²)" for w, m, s in zip(MSMA_TOY_WEIGHTS, MSMA_TOY_MEANS, MSMA_TOY_STDS))


# ----------------------------------------------------------------------------- MSMA Table 14


# MSMA appendix A.6 (Table 14), FashionMNIST → MNIST, in percent, as recorded in METHODS §2; the
# paper's AUPR-In is not recorded there (NaN).
MSMA_TABLE14 = {
    "gmm": {"name": "GMM", "fpr_at_80_tpr": 27.02, "auroc": 82.56, "aupr_in": float("nan")},
    "flow": {"name": "Flow", "fpr_at_80_tpr": 31.84, "auroc": 82.05, "aupr_in": float("nan")},
    "knn": {"name": "KD tree", "fpr_at_80_tpr": 43.27, "auroc": 69.32, "aupr_in": float("nan")},
}

TABLE14_COLUMNS = {
    "detector": ("detector (MSMA name)", ""),
    "fpr80_paper": ("FPR@80TPR MSMA", ".2f"), "fpr80": ("FPR@80TPR ours", ".2f"),
    "auroc_paper": ("AUROC MSMA", ".2f"), "auroc": ("AUROC ours", ".2f"),
    "aupr_in_paper": ("AUPR-In MSMA", ".2f"), "aupr_in": ("AUPR-In ours", ".2f"),
}


def table14(scores: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """MSMA Table 14 beside ours: FPR at 80 % TPR, AUROC and AUPR-In, in percent.

    Arguments:
        scores: detector name → (in-distribution scores (N_in,), OOD scores (N_ood,)), higher = more
            in-distribution; in-distribution is the positive class. Names in ``MSMA_TABLE14`` get the
            paper's numbers, others NaN.

    Returns:
        One row per detector with the keys of ``TABLE14_COLUMNS``.
    """
    rows = []
    for name, (s_in, s_ood) in scores.items():
        paper = MSMA_TABLE14.get(name, {"name": "-", "fpr_at_80_tpr": math.nan, "auroc": math.nan,
                                        "aupr_in": math.nan})
        rows.append({"detector": f"{name} ({paper['name']})",
                     "fpr80_paper": paper["fpr_at_80_tpr"], "fpr80": 100 * fpr_at_tpr(s_in, s_ood, 0.80),
                     "auroc_paper": paper["auroc"], "auroc": 100 * auroc(s_in, s_ood),
                     "aupr_in_paper": paper["aupr_in"], "aupr_in": 100 * aupr_in(s_in, s_ood)})
    return rows


def plot_table14(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, ood_name: str = "OOD") -> Path:
    """ROC curves of each detector with MSMA's operating point (FPR at 80 % TPR) marked as a cross.

    Arguments:
        scores: As for :func:`table14`.
        path: Output PNG.
        ood_name: Title name of the OOD set.
    """
    fig, axes = figure_grid(1, 1, (5.2, 5.0))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6")
    ax.axhline(0.8, ls=":", lw=1, color="0.4")
    for j, (name, (s_in, s_ood)) in enumerate(scores.items()):
        fpr, tpr = roc_curve(s_in, s_ood)
        ax.plot(fpr, tpr, color=f"C{j}", lw=1.5, label=f"{name}, ours (AUROC {auroc(s_in, s_ood):.3f})")
        if name in MSMA_TABLE14:
            paper = MSMA_TABLE14[name]
            ax.plot(paper["fpr_at_80_tpr"] / 100, 0.8, "x", ms=9, mew=2, color=f"C{j}",
                    label=f"MSMA {paper['name']} at 80 % TPR")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", xlabel="FPR (OOD accepted)",
           ylabel="TPR (in-dist. accepted)", title=f"in-dist. vs {ood_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return save_png(fig, path)


# ----------------------------------------------------------------------------- MSMA Fig. 5 (L and σ_H sweep)


def fig5_grids(l_values: Sequence[int] = (1, 3, 10, 15, 20), sigma_highs: Sequence[float] = (0.5, 1.0, 2.0, 10.0),
               sigma_low: float = 0.01, l_default: int = 10, sigma_high_default: float = 1.0) -> list[dict]:
    """The σ grids of MSMA §5.5 / Fig. 5: L varies at σ_H = ``sigma_high_default``, then σ_H at L = ``l_default``.

    Each grid is :func:`dgmood.models.noise.geometric_sigmas` (σ_H, σ_L, L), so L = 1 is σ_H alone.

    Returns:
        Dicts ``{"sweep": "L" | "sigma_high", "L", "sigma_high", "sigma_low", "sigmas": (L,) array}``.
    """
    grids = [{"sweep": "L", "L": int(n), "sigma_high": float(sigma_high_default)} for n in l_values]
    grids += [{"sweep": "sigma_high", "L": int(l_default), "sigma_high": float(s)} for s in sigma_highs]
    return [dict(g, sigma_low=float(sigma_low), sigmas=geometric_sigmas(g["sigma_high"], sigma_low, g["L"]))
            for g in grids]


FIG5_COLUMNS = {"sweep": ("sweep", ""), "L": ("L", "d"), "sigma_high": ("σ_H", "g"), "sigma_low": ("σ_L", "g")}


def fig5_table(features: Callable[[str, np.ndarray], np.ndarray], grids: Sequence[Mapping],
               detectors: Sequence[str] = ("knn", "gmm"), log: Callable[[str], None] | None = None) -> list[dict]:
    """AUROC per σ grid and detector, each detector fitted on that grid's training features (MSMA Fig. 5).

    Arguments:
        features: (role, sigmas) → feature matrix (N, L) for role ``"train"``, ``"in"`` or ``"ood"``;
            e.g. cached score norms of one continuous-σ model (no retraining per grid).
        grids: Output of :func:`fig5_grids`.
        detectors: Names of ``dgmood.detectors.estimators.DETECTORS``.
        log: Called with one progress line per grid.

    Returns:
        One row per grid: the keys of ``FIG5_COLUMNS``, ``auroc_<detector>`` per detector and
        ``seconds`` (features + fits + scoring). A grid that repeats one already done reuses its AUROCs.
    """
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {sorted(DETECTORS)}")
    done: dict[tuple, dict] = {}
    rows = []
    for grid in grids:
        key = tuple(np.round(np.asarray(grid["sigmas"], dtype=np.float64), 12))
        start = time.perf_counter()
        if key not in done:
            train, f_in, f_ood = (features(role, grid["sigmas"]) for role in ("train", "in", "ood"))
            _check_features(train=train, test_in=f_in, test_ood=f_ood)
            done[key] = {}
            for name in detectors:
                det = DETECTORS[name]().fit(train)
                done[key][f"auroc_{name}"] = auroc(det.score_samples(f_in), det.score_samples(f_ood))
        row = {k: grid[k] for k in FIG5_COLUMNS} | done[key] | {"seconds": time.perf_counter() - start}
        rows.append(row)
        if log is not None:
            log(f"{grid['sweep']}: L={grid['L']} σ_H={grid['sigma_high']:g} "
                + " ".join(f"{d}={row[f'auroc_{d}']:.4f}" for d in detectors) + f" ({row['seconds']:.0f} s)")
    return rows


def plot_fig5(rows: Sequence[Mapping], path: str | Path, detectors: Sequence[str] = ("knn", "gmm")) -> Path:
    """AUROC against L (left) and against σ_H (right, log axis), one line per detector (MSMA Fig. 5).

    Arguments:
        rows: Output of :func:`fig5_table`.
        path: Output PNG.
        detectors: Which ``auroc_<detector>`` columns to draw.
    """
    fig, axes = figure_grid(1, 2, (10.0, 4.0))
    for ax, sweep, key, label in ((axes[0, 0], "L", "L", "L (number of σ levels)"),
                                  (axes[0, 1], "sigma_high", "sigma_high", "σ_H (largest σ)")):
        part = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        if not part:
            ax.set_visible(False)
            continue
        fixed = (f"σ_H = {part[0]['sigma_high']:g}" if sweep == "L" else f"L = {part[0]['L']}")
        for j, d in enumerate(detectors):
            ax.plot([r[key] for r in part], [r[f"auroc_{d}"] for r in part], "o-", color=f"C{j}", label=d)
        ax.set(xlabel=label, ylabel="AUROC", title=f"{fixed}, σ_L = {part[0]['sigma_low']:g}")
        if sweep == "sigma_high":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_png(fig, path)
