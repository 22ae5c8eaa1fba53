"""Reproduce MSMA's findings (Mahmood et al., ICLR 2021) and the dual-threshold paper's (Kamkari et al., ICLR 2024),
one subcommand per finding.

Each subcommand writes ``OUT/<name>.png`` and ``OUT/<name>.md`` (a markdown table) and prints the
table; OUT defaults to docs/reproduction. See docs/reproduction.md for the results.

    python benchmarks/reproduce.py msma-fig1      # cached features of the demo run (seconds)
    python benchmarks/reproduce.py msma-toy       # analytic 1-D toy (no model)
    python benchmarks/reproduce.py msma-table14   # demo run's fitted detectors, full test sets
    python benchmarks/reproduce.py msma-fig5      # new σ grids: network passes on 3 × 2000 images
    python benchmarks/reproduce.py dual-hist      # likelihoods of test, OOD and generated images, both lenses
    python benchmarks/reproduce.py dual-gen       # "FMNIST-gen vs MNIST" without recalibration, both lenses
    python benchmarks/reproduce.py dual-ablation  # LPCA-calibrated τ / σ₀ against fixed values
    python benchmarks/reproduce.py dual-scatter   # the runs' stored dual evaluations redrawn
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402

from reproduction import msma as rp  # noqa: E402
from reproduction import dual as rd  # noqa: E402
from dgmood.data.datasets import parse_spec  # noqa: E402
from dgmood.utils.files import atomic_write  # noqa: E402
from dgmood.app.runs import Run, default_in_test
from dgmood.data.datasets import head_spec  # noqa: E402


def _write_table(args, name: str, table: str, note: str = "", figures: tuple[str, ...] = ()) -> None:
    """Write OUT/name.md (the command as an HTML comment, the table, an optional note) and print the table;
    ``figures`` names the PNGs the command wrote (default name.png)."""
    out, command = args.out, "python benchmarks/reproduce.py " + shlex.join(args.argv)
    text = f"<!-- {command} ({time.strftime('%Y-%m-%d')}) -->\n\n{table}\n" + (f"\n{note}\n" if note else "")
    atomic_write(out / f"{name}.md", lambda p: p.write_text(text, encoding="utf-8"))
    print(table)
    if note:
        print(note)
    print(f"wrote {', '.join(str(out / f) for f in figures or [name + '.png'])} and {out / (name + '.md')}")


def _run(args) -> Run:
    run = Run(args.run, progress=args.progress)
    run.config  # noqa: B018 — fails with one line when args.run is not a run
    return run


def _in_spec(args, run: Run) -> str:
    return args.in_spec or default_in_test(run.config.data) or run.config.in_test


def msma_fig1(args) -> None:
    """One σ vs all L: per-σ AUROCs, histograms at the lowest/highest σ, 2-D view (cached features)."""
    run = _run(args)
    sigmas = run.config.features.sigmas()
    train = run.features(run.fit_spec()).values
    f_in, f_ood = run.features(_in_spec(args, run)).values, run.features(args.ood).values
    rows = rp.fig1_table(train, f_in, f_ood, sigmas)
    rp.plot_fig1(train, f_in, f_ood, sigmas, args.out / "msma-fig1.png", ood_name=args.ood)
    note = (f"Training features: {run.fit_spec()} ({len(train)}); in: {_in_spec(args, run)} ({len(f_in)}); "
            f"OOD: {args.ood} ({len(f_ood)}).")
    _write_table(args, "msma-fig1", rp.markdown_table(rows, rp.FIG1_COLUMNS), note)


def msma_toy(args) -> None:
    """The analytic 1-D toy of MSMA §2.1 (Figs. 2-3)."""
    rp.plot_toy(args.out / "msma-toy.png")
    rows = rp.toy_table()
    _write_table(args, "msma-toy", rp.markdown_table(rows, rp.toy_columns()))


def msma_table14(args) -> None:
    """MSMA Table 14 on our split, from the run's fitted detectors and cached features."""
    run = _run(args)
    in_spec = _in_spec(args, run)
    detectors = run.detectors()
    f_in, f_ood = run.features(in_spec).values, run.features(args.ood).values
    order = [d for d in ("gmm", "flow", "knn") if d in detectors] + [d for d in detectors if d not in rp.MSMA_TABLE14]
    scores = {d: (detectors[d].score_samples(f_in), detectors[d].score_samples(f_ood)) for d in order}
    rp.plot_table14(scores, args.out / "msma-table14.png", ood_name=args.ood)
    note = (f"Ours: detectors fitted on {run.fit_spec()}, in: {in_spec} ({len(f_in)}), OOD: {args.ood} "
            f"({len(f_ood)}); percent, in-distribution positive.")
    _write_table(args, "msma-table14", rp.markdown_table(rp.table14(scores), rp.TABLE14_COLUMNS), note)


def msma_fig5(args) -> None:
    """AUROC against L and σ_H with one continuous-σ model: features per grid (cached), detectors refitted."""
    run = _run(args)
    specs = {"train": head_spec(run.config.data, args.train_n), "in": head_spec(_in_spec(args, run), args.test_n),
             "ood": head_spec(args.ood, args.test_n)}
    grids = rp.fig5_grids(args.l_values, args.sigma_highs, args.sigma_low, args.l_default, args.sigma_high_default)
    detectors = args.detectors.split(",")
    rows = rp.fig5_table(lambda role, sigmas: run.features(specs[role], sigmas).values, grids, detectors,
                         log=lambda line: print(line, flush=True))
    rp.plot_fig5(rows, args.out / "msma-fig5.png", detectors)
    columns = dict(rp.FIG5_COLUMNS) | {f"auroc_{d}": (f"AUROC {d}", ".4f") for d in detectors}
    note = (f"Fitted on {specs['train']}; in: {specs['in']}; OOD: {specs['ood']}; one model "
            f"({run.directory}), no retraining; {sum(r['seconds'] for r in rows):.0f} s in all (network passes only "
            "for features not yet in the run's cache).")
    _write_table(args, "msma-fig5", rp.markdown_table(rows, columns), note)


# ----------------------------------------------------------------------------- the dual-threshold paper


def _lenses(args) -> dict:
    """lens name → (LensStats, stored calibration, set names by role), for each lens of --lenses."""
    runs = {"diffusion": (args.score_run, args.diffusion_n, args.diffusion_gen),
            "flow": (args.flow_run, args.flow_n, args.flow_gen)}
    out = {}
    for name in args.lenses.split(","):
        if name not in runs:
            raise ValueError(f"unknown lens {name!r}; choose diffusion and/or flow")
        run, n_test, n_gen = runs[name]
        out[name] = rd.open_lens(rd.LensSetup(run, n_test, n_gen, args.in_spec, args.ood, args.seed, args.progress))
        if out[name][0].config.lens.lens != name:
            raise ValueError(f"--{'score' if name == 'diffusion' else 'flow'}-run {run} is not a {name} run")
    return out


def _short_name(spec: str) -> str:
    """A dataset's name without split or slice (``mnist:test[:500]`` → ``mnist``), a file's stem."""
    parsed = parse_spec(spec)
    return parsed.name if parsed.kind in ("named", "synthetic") else Path(parsed.name).stem


def _set_names(args) -> dict[str, str]:
    return {"in": "in-dist. test", "ood": f"OOD ({args.ood})", "generated": "generated"}


def _sets_note(lenses: dict, samples: bool = True) -> str:
    """Which sets each lens used and the seconds per image of the statistics of its samples."""
    lines = []
    for name, (stats, calib, specs) in lenses.items():
        timing = ", ".join(f"{stat} {1000 * s:.0f} ms" for (stat, spec), s in stats.seconds.items()
                           if spec == specs["generated"])
        lines.append(f"{name} ({stats.run.directory}): in {specs['in']}, OOD {specs['ood']}, thresholds fitted on "
                     f"{specs['fit']}" + (f", samples {specs['generated']}" if samples else "")
                     + f"; {calib['parameter']} = {calib['value']:.4g} (stored calibration, LPCA target "
                     f"{calib['target_lpca']:.1f})" + (f"; per generated image: {timing}" if timing else "") + ".")
    return "\n".join(lines)


def dual_hist(args) -> None:
    """Likelihood (bits/dim) histograms of in-distribution test, OOD and generated images (Fig. 2 of the paper)."""
    lenses = _lenses(args)
    bpd = {name: {role: stats.bits_per_dim(specs[role]) for role in ("in", "ood", "generated")}
           for name, (stats, _, specs) in lenses.items()}
    samples = {name: stats.images[specs["generated"]]() for name, (stats, _, specs) in lenses.items()}
    rd.plot_hist(bpd, samples, args.out / "dual-hist.png", _set_names(args))
    table = rp.markdown_table(rd.hist_rows(bpd, _set_names(args)), rd.HIST_COLUMNS)
    _write_table(args, "dual-hist", table, _sets_note(lenses))


def dual_gen(args) -> None:
    """"FMNIST-gen vs MNIST": the samples as in-distribution set, stored τ / σ₀ and training thresholds (App. D.4)."""
    lenses = _lenses(args)
    rows, pairs, thresholds = [], {}, {}
    for name, (stats, calib, specs) in lenses.items():
        p = {role: stats.pairs(specs[role], calib["value"]) for role in ("in", "generated", "ood", "fit")}
        data, ood = _short_name(stats.run.config.data), _short_name(args.ood)
        for role, what in (("in", "test"), ("generated", "gen")):
            row = rd.task_row(p[role], p["ood"], p["fit"], stats.config.acceptance)
            rows.append(dict(row, lens=name, task=f"{data}-{what} vs {ood}"))
        pairs[name] = {role: p[role] for role in ("in", "generated", "ood")}
        thresholds[name] = rows[-1]["thresholds"]
    rd.plot_gen(pairs, thresholds, args.out / "dual-gen.png", _set_names(args))
    _write_table(args, "dual-gen", rp.markdown_table(rows, rd.GEN_COLUMNS), _sets_note(lenses))


def dual_ablation(args) -> None:
    """AUROCs and mean LID at the LPCA-calibrated τ / σ₀ against fixed multiples of it (App. C, Table 2)."""
    lenses = _lenses(args)
    rows = []
    for stats, calib, specs in lenses.values():
        rows += rd.ablation_rows(stats, specs, calib, args.factors, stats.config.acceptance,
                                 log=lambda line: print(line, flush=True))
    rd.plot_ablation(rows, args.out / "dual-ablation.png")
    _write_table(args, "dual-ablation", rp.markdown_table(rows, rd.ABLATION_COLUMNS), _sets_note(lenses, False))


def dual_scatter(args) -> None:
    """The runs' stored dual evaluations redrawn from cached statistics: likelihood–LID scatter and dual ROC."""
    rows, notes = [], []
    for run in (args.score_run, args.flow_run):
        part, evaluation = rd.scatter_outputs(run, args.out, args.progress)
        rows += part
        notes.append(f"{part[0]['lens']} ({run}): in {evaluation['in']}, thresholds fitted on the first "
                     f"{evaluation['fit_n']} training images")
    figures = tuple(f"dual-{kind}-{lens}.png" for lens in dict.fromkeys(r["lens"] for r in rows)
                    for kind in ("scatter", "roc"))
    _write_table(args, "dual-scatter", rp.markdown_table(rows, rd.SCATTER_COLUMNS), "; ".join(notes) + ".", figures)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/reproduction"), help="folder for the PNG and table")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)

    def with_run(name: str, func, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--run", type=Path, default=Path("runs/fm-score"), help="trained score-model run directory (the reference (48, 96, 96) model)")
        s.add_argument("--in", dest="in_spec", default="", help="in-distribution test set (default: NAME:test)")
        s.add_argument("--ood", default="mnist:test", help="OOD test set")
        s.add_argument("--progress", action="store_true", help="show progress bars of network passes")
        s.set_defaults(func=func)
        return s

    with_run("msma-fig1", msma_fig1, "one σ vs all L (MSMA Fig. 1)")
    toy = sub.add_parser("msma-toy", help="analytic 1-D toy (MSMA Figs. 2-3)")
    toy.set_defaults(func=msma_toy)
    with_run("msma-table14", msma_table14, "FashionMNIST → MNIST table (MSMA Table 14)")
    f5 = with_run("msma-fig5", msma_fig5, "AUROC against L and σ_H (MSMA Fig. 5)")
    f5.add_argument("--train-n", type=int, default=2000, help="training images whose features fit the detectors")
    f5.add_argument("--test-n", type=int, default=2000, help="images of the in-distribution and of the OOD test set")
    f5.add_argument("--detectors", default="knn,gmm", help="comma-separated detectors refitted per grid")
    f5.add_argument("--l-values", type=_ints, default=[1, 3, 10, 15, 20], help="L of the L sweep")
    f5.add_argument("--sigma-highs", type=_floats, default=[0.5, 1.0, 2.0, 10.0], help="σ_H of the σ_H sweep")
    f5.add_argument("--sigma-low", type=float, default=0.01, help="σ_L of every grid")
    f5.add_argument("--l-default", type=int, default=10, help="L of the σ_H sweep")
    f5.add_argument("--sigma-high-default", type=float, default=1.0, help="σ_H of the L sweep")

    def with_lenses(name: str, func, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--score-run", type=Path, default=Path("runs/fm-score"), help="score-model run (diffusion lens)")
        s.add_argument("--flow-run", type=Path, default=Path("runs/flow"), help="flow run (flow lens)")
        s.add_argument("--progress", action="store_true", help="show progress bars of network passes")
        s.set_defaults(func=func)
        if name == "dual-scatter":  # the sets of the stored evaluations
            return s
        s.add_argument("--lenses", default="diffusion,flow", help="comma-separated lenses")
        s.add_argument("--in", dest="in_spec", default="", help="in-distribution test set (default: NAME:test)")
        s.add_argument("--ood", default="mnist:test", help="OOD test set")
        s.add_argument("--diffusion-n", type=int, default=500,
                       help="first N images of the in-dist. test, OOD and training sets (diffusion lens)")
        s.add_argument("--flow-n", type=int, default=150, help="the same for the flow lens")
        s.add_argument("--diffusion-gen", type=int, default=200, help="samples of the score model")
        s.add_argument("--flow-gen", type=int, default=150, help="samples of the flow")
        s.add_argument("--seed", type=int, default=0, help="seed of the samples")
        return s

    with_lenses("dual-hist", dual_hist, "likelihoods of test, OOD and generated images (dual-threshold Fig. 2)")
    with_lenses("dual-gen", dual_gen, "generated vs OOD without recalibration (dual-threshold App. D.4)")
    ab = with_lenses("dual-ablation", dual_ablation, "LPCA-calibrated vs fixed τ / σ₀ (dual-threshold App. C)")
    ab.add_argument("--factors", type=_floats, default=[0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0],
                    help="multiples of the calibrated τ / σ₀")
    with_lenses("dual-scatter", dual_scatter, "the stored dual evaluations redrawn (dual-threshold Figs. 1, 4)")
    sub.add_parser("all", help="every command above with its defaults: regenerates every figure and table")
    return p


COMMANDS = ("msma-fig1", "msma-toy", "msma-table14", "msma-fig5", "dual-hist", "dual-gen", "dual-ablation",
            "dual-scatter")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.command == "all":
        common = ["--out", str(args.out), "--threads", str(args.threads)]
        return max(main([*common, name]) for name in COMMANDS)
    args.argv = argv
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
