"""Cheaper PF-ODE solvers of the diffusion-lens likelihood against the adaptive one (issue 11).

Usage: ``python benchmarks/solvers.py --run runs/demo [--n 500] [--solver heun:8:geometric:1 ...] [--threads 2]``

For each solver (``adaptive``, or ``heun|euler:STEPS:uniform|geometric[:PROBES]``, 4 Hutchinson probes unless
given; the first one listed is the reference): the log-likelihood of the first ``--n``
in-distribution test images and ``--n`` images of the other dataset, seconds per image and network evaluations,
its bias against the adaptive solution (mean and largest |Δ| in nats per dimension), the likelihood-alone AUROC,
and the dual-threshold AUROC (likelihood and FLIPD LID both above thresholds fitted on 500 training images).
Writes ``OUT/solvers.json`` and prints a markdown table. No OOD image fits or chooses anything; the AUROCs only
check that a cheaper solver changes nothing that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dgmood.app.runs import Run  # noqa: E402
from dgmood.detectors.dual import DualThresholdDetector  # noqa: E402
from dgmood.evaluation.metrics import evaluate  # noqa: E402
from dgmood.methods.image_detector import ImageDetector  # noqa: E402
from dgmood.statistics.flipd import FLIPD  # noqa: E402
from dgmood.statistics.lens import parse_solver  # noqa: E402
from dgmood.statistics.likelihood import LogLikelihood  # noqa: E402

DEFAULT_SOLVERS = ("adaptive", "heun:4:geometric", "heun:8:geometric", "heun:8:uniform", "euler:25:uniform")


def likelihood_stat(name: str) -> LogLikelihood:
    """``adaptive[:::PROBES]`` or ``SOLVER:STEPS:SPACING[:PROBES]`` as the diffusion lens's log-likelihood statistic
    (4 Hutchinson probes unless given; the rest as :func:`~dgmood.statistics.lens.parse_solver` reads it)."""
    parts = name.split(":")
    solver, steps, spacing = parse_solver(":".join(parts[:3]).rstrip(":"))
    return LogLikelihood("diffusion", solver=solver, steps=steps, spacing=spacing,
                         probes=int(parts[3]) if len(parts) > 3 and parts[3] else 4)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--solver", action="append", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-solvers"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(args.run, progress=True)
    in_spec = f"{(run.config.in_test or run.config.data + ':test').split('[')[0]}[:{args.n}]"
    ood_spec = f"{'mnist' if 'fashion' in run.config.data else 'fashion-mnist'}:test[:{args.n}]"
    train = run.images(run.config.data)
    test = {s: run.images(s) for s in (in_spec, ood_spec)}
    dim = train[0].size
    flipd = FLIPD(probes=4)
    rows, reference = {}, None
    for name in args.solver or DEFAULT_SOLVERS:
        stat = likelihood_stat(name)
        det = ImageDetector(run.model, [stat, flipd], DualThresholdDetector(), "dual-threshold", False)
        det.fit(train, fit_n=500)
        start = time.perf_counter()
        values = {s: stat.compute(run.model, x) for s, x in test.items()}
        seconds = (time.perf_counter() - start) / sum(len(x) for x in test.values())
        dual = {s: det.score_values({stat.name: values[s], flipd.name: flipd.compute(run.model, x)})
                for s, x in test.items()}
        both = np.concatenate(list(values.values()))
        reference = both if reference is None else reference
        row = {"seconds_per_image": seconds,
               "likelihood_auroc": evaluate(values[in_spec], values[ood_spec])["auroc"],
               "dual_auroc": evaluate(dual[in_spec], dual[ood_spec])["auroc"],
               "bias_mean_nats_per_dim": float(np.mean(both - reference) / dim),
               "abs_max_nats_per_dim": float(np.max(np.abs(both - reference)) / dim)}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    base = rows[next(iter(rows))]["seconds_per_image"]
    lines = ["| solver | s / image | speed-up | mean Δ nats/dim | max abs Δ | likelihood AUROC | dual AUROC |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['seconds_per_image']:.4f} | {base / r['seconds_per_image']:.1f}× | "
              f"{r['bias_mean_nats_per_dim']:+.4f} | {r['abs_max_nats_per_dim']:.4f} | {r['likelihood_auroc']:.4f} | "
              f"{r['dual_auroc']:.4f} |" for k, r in rows.items()]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "solvers.json").write_text(json.dumps({"in": in_spec, "ood": ood_spec, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
