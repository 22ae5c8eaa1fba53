"""Dual-threshold benchmark (issue 3): likelihood + LID through the flow and diffusion lenses.

Usage: ``make bench-dual`` or
``python benchmarks/dual.py --flow-run runs/flow --score-run runs/fm-score --mnist-score-run runs/mnist-score-ref``.
Every run must be trained first (``dgmood train --model flow`` / ``dgmood train``); statistics are cached in
each run, so a rerun only re-reports. Prints, per lens and OOD set: likelihood-alone AUROC (the paradox:
below 0.5 on MNIST), the dual-threshold detector's AUROC (its single deployable score), the optimal-ROC AUC
of the threshold pair (the papers' number), and the time per image of every statistic, with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402

from dgmood.methods.dual_threshold import DualConfig, evaluate_dual, write_dual_outputs  # noqa: E402
from dgmood.statistics.lens import LensConfig  # noqa: E402
from dgmood.app.runs import Run  # noqa: E402

TARGETS = {  # (lens, in-distribution) → target AUROC of the dual threshold on the dataset-swap OOD set
    ("flow", "fashion-mnist"): 0.95, ("diffusion", "fashion-mnist"): 0.90, ("diffusion", "mnist"): 0.99,
    ("flow", "mnist"): 0.99,
}


def _oods(swap: str, n: int, n_noise: int) -> list[str]:
    return [f"{swap}:test[:{n}]", f"uniform[:{n_noise}]", f"gaussian[:{n_noise}]"]


def run_case(run_dir: Path, lens: LensConfig, in_name: str, swap: str, n: int, n_noise: int, fit_n: int,
             quiet: bool) -> dict:
    """Evaluate one (run, lens, LID) case on ``n`` test images of each set (``n_noise`` of each noise set)."""
    run = Run(run_dir, progress=not quiet)
    config = DualConfig(lens=lens, fit_n=fit_n)
    in_spec = f"{in_name}:test[:{n}]"
    start = time.perf_counter()
    ev = evaluate_dual(run, config, _oods(swap, n, n_noise), in_spec)
    write_dual_outputs(run, config, ev, in_spec, time.perf_counter() - start)
    rows = []
    for ood, metrics in ev.results["dual-threshold"].items():
        rows.append({
            "lens": lens.lens, "lid": lens.lid, "in": in_spec, "ood": ood,
            "likelihood": ev.results["likelihood"][ood]["auroc"],
            "lid_alone": ev.results["lid"][ood]["auroc"],
            "dual": metrics["auroc"], "dual_fpr95": metrics["fpr_at_95_tpr"],
            "optimal_dual": metrics["auroc_optimal_dual"],
            "baselines": {m: r[ood]["auroc"] for m, r in ev.results.items()
                          if m not in ("dual-threshold", "likelihood", "lid")},
            "target": TARGETS.get((lens.lens, in_name)) if ood.startswith(swap) else None,
            "seconds_per_image": ev.seconds_per_image, "calibration": ev.calibration,
        })
    return {"rows": rows, "report": str(ev.directory / "report.md")}


def time_statistics(cases: dict, n: int, threads: int) -> list[dict]:
    """Seconds per image of every statistic of every lens, measured on ``n`` test images with no cache.
    Run with nothing else on the machine: the evaluation's own timings share the cores with whatever ran."""
    from dgmood.statistics.lens import compute_statistic, statistic_names

    rows, seen = [], set()
    for name, (run_dir, lens, in_name, *_) in cases.items():
        if not (run_dir / "checkpoint" / "checkpoint.json").is_file():
            continue
        run = Run(run_dir, progress=False)
        images = run.images(f"{in_name}:test[:{n}]")
        for stat in statistic_names(lens):
            if (run_dir, stat) in seen:
                continue
            seen.add((run_dir, stat))
            extra = {"sigma0": 0.05} if stat == "flipd" else {}
            compute_statistic(run.model, images[:2], lens, stat, **extra, progress=False)  # warm-up
            _, seconds = compute_statistic(run.model, images, lens, stat, progress=False, **extra)
            rows.append({"case": name, "lens": lens.lens, "lid": lens.lid, "statistic": stat,
                         "ms_per_image": 1000 * seconds, "threads": threads, "n": n})
            print(f"{name:6s} {stat:18s} {1000 * seconds:9.1f} ms/image")
    return rows


def _print(rows: list[dict]) -> None:
    print("\n| lens | LID | OOD set | likelihood | LID alone | dual (detector) | dual FPR95 | optimal dual | target |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        target = "" if r["target"] is None else (
            f"≥ {r['target']}: {'met' if r['optimal_dual'] >= r['target'] else 'missed'} (optimal), "
            f"{'met' if r['dual'] >= r['target'] else 'missed'} (detector)")
        print(f"| {r['lens']} | {r['lid']} | {r['ood']} | {r['likelihood']:.4f} | {r['lid_alone']:.4f} | "
              f"{r['dual']:.4f} | {100 * r['dual_fpr95']:.1f}% | {r['optimal_dual']:.4f} | {target} |")
    print("\n| lens | LID | baselines (AUROC per OOD set) |")
    print("|---|---|---|")
    for r in rows:
        base = ", ".join(f"{m} {v:.4f}" for m, v in r["baselines"].items())
        print(f"| {r['lens']} | {r['lid']} | {r['ood']}: {base} |")
    print("\n| lens | LID | statistic | ms per image (during this run, cores shared) |")
    print("|---|---|---|---:|")
    seen = set()
    for r in rows:
        for stat, s in r["seconds_per_image"].items():
            if (r["lens"], r["lid"], stat) not in seen:
                seen.add((r["lens"], r["lid"], stat))
                print(f"| {r['lens']} | {r['lid']} | {stat} | {1000 * s:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow-run", type=Path, default=Path("runs/flow"))
    parser.add_argument("--score-run", type=Path, default=Path("runs/fm-score"))
    parser.add_argument("--mnist-score-run", type=Path, default=Path("runs/mnist-score-ref"))
    parser.add_argument("--mnist-flow-run", type=Path, default=Path("runs/mnist-flow"))
    parser.add_argument("--n", type=int, default=500, help="in-distribution and dataset-swap test images")
    parser.add_argument("--n-noise", type=int, default=200, help="images of each noise set")
    parser.add_argument("--n-flow", type=int, default=150,
                        help="test and fitting images of the flow lens (half as many per noise set)")
    parser.add_argument("--n-nb", type=int, default=100,
                        help="test and fitting images of the FLIPD vs normal-bundle comparison (the bundle is slow)")
    parser.add_argument("--fit-n", type=int, default=500, help="training images that fit the thresholds")
    parser.add_argument("--only", default="", help="comma-separated subset of flow,flipd,flipd-small,nb,mnist,mnist-flow")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dual.json"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--timing", type=int, default=0, metavar="N",
                        help="only measure seconds per image of every statistic on N images (idle machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flipd, nb = LensConfig("diffusion", "flipd"), LensConfig("diffusion", "normal-bundle")
    small = (args.n_nb, args.n_nb // 2, args.n_nb)  # test images, noise images, fitting images
    full = (args.n, args.n_noise, args.fit_n)
    flow_sizes = (args.n_flow, args.n_flow // 2, args.n_flow)  # the Jacobian costs ~1.5 s per image
    cases = {  # name → (run, lens, in-distribution, dataset-swap OOD, sizes)
        "flow": (args.flow_run, LensConfig("flow", "jacobian"), "fashion-mnist", "mnist", flow_sizes),
        "flipd": (args.score_run, flipd, "fashion-mnist", "mnist", full),
        # FLIPD and the normal bundle on the same smaller sets: AUROC and time side by side
        "flipd-small": (args.score_run, flipd, "fashion-mnist", "mnist", small),
        "nb": (args.score_run, nb, "fashion-mnist", "mnist", small),
        "mnist": (args.mnist_score_run, flipd, "mnist", "fashion-mnist", full),
        "mnist-flow": (args.mnist_flow_run, LensConfig("flow", "jacobian"), "mnist", "fashion-mnist", flow_sizes),
    }
    chosen = [c for c in args.only.split(",") if c] or list(cases)
    if args.timing:
        rows = time_statistics({c: cases[c] for c in chosen}, args.timing, args.threads)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        return
    rows = []
    for name in chosen:
        run_dir, lens, in_name, swap, sizes = cases[name]
        if not (run_dir / "checkpoint" / "checkpoint.json").is_file():
            print(f"skipping {name}: no trained model in {run_dir}")
            continue
        case = run_case(run_dir, lens, in_name, swap, *sizes, args.quiet)
        rows += case["rows"]
        print(f"{name}: report in {case['report']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2, default=float) + "\n")
    _print(rows)


if __name__ == "__main__":
    main()
