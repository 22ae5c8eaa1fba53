"""Natural photographs at the papers' scale (issue 27): CIFAR-10 in, near and far OOD out.

Usage: ``make bench-cifar`` (trains ``runs/cifar10`` first, resumable), or on a trained run
``python benchmarks/cifar.py --run runs/cifar10 [--n N] [--dual-n 500] [--threads 2]``.

Every detector is fitted on CIFAR-10 training images only; nothing is chosen on OOD data. Sets, all brought to the
model's 32 × 32 RGB by the product's own image policy (``--resize crop``):

- the 10,000 CIFAR-10 test images (in-distribution);
- OOD: Tiny ImageNet validation (64 × 64 photographs: near OOD), MNIST and FashionMNIST as RGB, uniform, Gaussian
  and constant noise; each **as it is** and **JPEG-matched**, after the JPEG quality 75 4:2:0 round trip at 32 × 32
  the training images went through, so that compression cannot be the cue;
- flagged checks made from a seeded random 2,000 of the test images (``--check-n``): vertical flip, rotation by 90°, colour
  removed, inverted, 1-pixel blur, local defects at 4/6/8 pixels; and accepted checks: horizontal flip, JPEG quality
  90, PNG (``benchmarks/checks.py``).

Derived sets are written once as uint8 ``.npy`` files under ``RUN/bench-sets`` and used as dataset specs, so the
run's statistic cache serves every rerun. Prints markdown tables (AUROC, FPR at 95 % TPR, acceptance at the
default threshold) and writes ``RUN/bench-cifar.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import checks  # noqa: E402

from dgmood.app.runs import Run  # noqa: E402
from dgmood.data import datasets  # noqa: E402

OOD = {"Tiny ImageNet": "tiny-imagenet", "MNIST": "mnist:test", "FashionMNIST": "fashion-mnist:test",
       "uniform": "uniform[:1000]", "gaussian": "gaussian[:1000]", "constant": "constant[:1000]"}
"""The OOD sets (label → spec); the noise sets are 1,000 images each."""

METHODS = {"combined": "combined (default)", "msma-knn": "MSMA k-NN", "pixel-knn": "pixel 5-NN"}
"""Methods of the main tables (name → column heading)."""


def materialise(folder: Path, name: str, make) -> str:
    """The spec of ``folder/name.npy``, written from ``make()`` (float images in [0, 1]) when missing."""
    path = folder / (re.sub(r"[^A-Za-z0-9_-]+", "_", name) + ".npy")
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, checks.to_uint8(make()).transpose(0, 2, 3, 1))  # dgmood reads .npy images as (N, H, W, C)
        os.replace(tmp, path)
    return str(path)


def sample(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random sample of ``n`` of ``n_total`` images (all when n ≥ n_total): the test
    archive is sorted by class, so its first images are one or two classes only."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def build_sets(run: Run, in_spec: str, n: int | None, check_n: int) -> tuple[dict, dict, dict]:
    """(OOD sets, flagged checks, accepted checks), each label → spec; derived sets written under RUN/bench-sets.
    The checks are made from a seeded random sample of ``check_n`` test images (every class)."""
    folder = run.directory / "bench-sets"
    ood = {}
    for label, spec in OOD.items():
        spec = spec if n is None or "[" in spec else f"{spec}[:{n}]"
        ood[label] = spec
        ood[f"{label}, JPEG-matched"] = materialise(folder, f"jpeg75-{spec}", lambda s=spec: checks.jpeg(run.images(s)))
    labels = datasets.load_labels(in_spec, run.data_dir)
    picked = sample(len(labels), check_n)
    tag = f"{in_spec}-sample{len(picked)}"
    test = functools.cache(lambda: run.images(in_spec)[picked])  # decoded once for every check
    donors = (labels[picked], run.images(run.config.data), datasets.load_labels(run.config.data, run.data_dir))
    made = checks.FLAGGED | checks.defect_checks(donors=donors)
    flagged = {name: materialise(folder, f"{name}-{tag}", lambda f=f: f(test())) for name, f in made.items()}
    accepted = {name: materialise(folder, f"{name}-{tag}", lambda f=f: f(test())) for name, f in checks.ACCEPTED.items()}
    return ood, flagged, accepted


def _cell(metrics: dict) -> str:
    return f"{metrics['auroc']:.4f} ({100 * metrics['fpr_at_95_tpr']:.1f} %)"


def ood_table(ev, ood: dict) -> str:
    """AUROC (FPR95) of each method on each OOD set, as it is and JPEG-matched."""
    lines = ["| OOD set | " + " | ".join(METHODS.values()) + " |", "|---|" + "---:|" * len(METHODS)]
    for label, spec in ood.items():
        lines.append(f"| {label} | " + " | ".join(_cell(ev.results[m][spec]) for m in METHODS) + " |")
    return "\n".join(lines)


def acceptance(ev, dets: dict, method: str, spec: str | None) -> float:
    """Share of a set's images at or above ``method``'s default threshold (None: the in-distribution test set)."""
    scores = ev.scores[method]["in"] if spec is None else ev.scores[method]["ood"][spec]
    return float(np.mean(scores >= dets[method].threshold))


def checks_table(ev, dets: dict, flagged: dict, accepted: dict) -> str:
    """AUROC of each method against the test set on each flagged check; the accepted share on each accepted one."""
    lines = ["| check | kind | " + " | ".join(METHODS.values()) + " |", "|---|---|" + "---:|" * len(METHODS)]
    lines.append("| test set itself | accepted | " + " | ".join(f"{100 * acceptance(ev, dets, m, None):.1f} %"
                                                           for m in METHODS) + " |")
    for name, spec in accepted.items():
        lines.append(f"| {name} | accepted | " + " | ".join(f"{100 * acceptance(ev, dets, m, spec):.1f} %"
                                                         for m in METHODS) + " |")
    for name, spec in flagged.items():
        lines.append(f"| {name} | flagged (AUROC) | " + " | ".join(f"{ev.results[m][spec]['auroc']:.4f}"
                                                                 for m in METHODS) + " |")
    return "\n".join(lines)


def dual_rows(run: Run, in_spec: str, ood: dict, n: int) -> tuple[str, dict]:
    """The dual threshold through the diffusion lens (FLIPD) on a seeded random ``n`` test images and the first ``n``
    images of the main OOD sets (in random order already): its
    likelihood alone (the paradox?), its LID alone, the deployable detector and the optimal threshold pair. The
    PF-ODE likelihood by 8 Heun steps on a geometric grid (10× the adaptive solver's speed, AUROCs within 0.002 of
    it on FashionMNIST, docs/results.md); thresholds fitted on 500 training images."""
    from dgmood.methods.dual_threshold import DualConfig, evaluate_dual
    from dgmood.statistics.lens import LensConfig

    picked = {k: v for k, v in ood.items() if k.split(",")[0] in ("Tiny ImageNet", "MNIST", "uniform")}
    specs = {label: f"{spec.split('[')[0]}[:{n}]" for label, spec in picked.items()}  # those sets are in random order
    in_sample = materialise(run.directory / "bench-sets", f"{in_spec}-sample{n}",
                            lambda: (x := run.images(in_spec))[sample(len(x), n)])
    lens = LensConfig(lens="diffusion", lid="flipd", solver="heun", steps=8, spacing="geometric")
    ev = evaluate_dual(run, DualConfig(lens=lens), list(specs.values()), in_sample)
    lines = ["| OOD set (n) | likelihood alone | LID alone | dual (detector) | optimal dual |", "|---|---:|---:|---:|---:|"]
    for label, spec in specs.items():
        r = ev.results
        lines.append(f"| {label} ({n}) | {r['likelihood'][spec]['auroc']:.4f} | {r['lid'][spec]['auroc']:.4f} | "
                     f"{r['dual-threshold'][spec]['auroc']:.4f} | {r['dual-threshold'][spec]['auroc_optimal_dual']:.4f} |")
    return "\n".join(lines), {"results": ev.results, "calibration": ev.calibration,
                              "seconds_per_image": ev.seconds_per_image}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/cifar10"))
    parser.add_argument("--n", type=int, default=None, help="first n images of each set (default: all)")
    parser.add_argument("--check-n", type=int, default=2000, help="test images the checks are made from")
    parser.add_argument("--dual-n", type=int, default=500, help="images per set for the dual threshold (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="", help="NAME=JSON overrides of the combined detector's MethodConfig "
                        "(written to RUN/bench-cifar-NAME.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(args.run, progress=True)
    in_spec = run.config.in_test if args.n is None else f"{run.config.in_test}[:{args.n}]"
    start = time.perf_counter()
    ood, flagged, accepted = build_sets(run, in_spec, args.n, args.check_n)
    name, _, overrides = args.variant.partition("=")
    config = run.method_config(**json.loads(overrides or "{}"))
    ev, dets = run.evaluate_methods(list(METHODS), [*ood.values(), *flagged.values(), *accepted.values()], in_spec,
                                    config=config)
    tables = {"ood": ood_table(ev, ood), "checks": checks_table(ev, dets, flagged, accepted)}
    out = {"in": in_spec, "train": run.config.data, "results": ev.results, "model_sha256": run.model_sha,
           "acceptance": {m: {name: acceptance(ev, dets, m, spec) for name, spec in {"test": None, **accepted}.items()}
                          for m in METHODS},
           "sigma0": [s.sigma0_ for s in dets["combined"].statistics if s.name == "flipd"],
           "seconds": time.perf_counter() - start}
    print(tables["ood"], "", tables["checks"], sep="\n", flush=True)
    if args.dual_n:
        tables["dual"], out["dual"] = dual_rows(run, in_spec, ood, args.dual_n)
        print("", tables["dual"], sep="\n")
    out["tables"] = tables
    target = args.run / (f"bench-cifar-{name}.json" if name else "bench-cifar.json")
    target.write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
