"""Benchmark: every detector, ours and the baselines, on every visible OOD set, with time per image.

Usage: ``make bench`` (or ``python benchmarks/bench.py --run runs/fm-long --mnist-run runs/mnist-score --ablate``).
Two blocks: a FashionMNIST model against MNIST, noise and constant images and three shifts of its own test
images (inverted, vertically flipped, rotated by 90°; in-distribution-only checks that need no OOD data); and
an MNIST model against FashionMNIST and the same kinds of sets. Rows: our MSMA detectors (5-NN, GMM, flow on
score norms), the combined detector (and its ablations with ``--ablate``), the raw-pixel 5-NN and PyOD's
DeepSVDD on raw pixels. Runs are trained when missing (4,000 steps for FashionMNIST, 1,500 for MNIST);
every network statistic is cached in the run, so a second call only refits and scores. Writes ``OUT/bench.md`` and ``OUT/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402

from dgmood.data import datasets as datasets  # noqa: E402
from dgmood.methods.combined import FEATURES  # noqa: E402
from dgmood.statistics.knn import knn_distance  # noqa: E402
from dgmood.detectors.estimators import CombinedDetector  # noqa: E402
from dgmood.statistics.score_norms import FeatureCache, score_norms  # noqa: E402
from dgmood.models.losses import dsm_loss  # noqa: E402
from dgmood.evaluation.metrics import evaluate  # noqa: E402
from dgmood.models.network import NetConfig, ScoreNet  # noqa: E402
from dgmood.app.runs import FeatureConfig, Run, RunConfig  # noqa: E402
from dgmood.models.train import TrainConfig  # noqa: E402

SYNTHETIC = ["uniform[:2000]", "gaussian[:2000]", "constant[:2000]"]
SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "invert": lambda x: 1.0 - x,
    "vflip": lambda x: np.ascontiguousarray(x[..., ::-1, :]),
    "rot90": lambda x: np.ascontiguousarray(np.rot90(x, axes=(2, 3))),
}
"""Shifts of the in-distribution test images (the first ``SHIFT_N``): OOD checks built from in-distribution data."""
SHIFT_N = 2000


def train_throughput(config: NetConfig, batch: int = 128, steps: int = 15, amp: bool = False) -> float:
    """Images/s of DSM training steps (forward + backward + Adam) after 3 warm-up steps; ``amp``: the forward pass
    under bf16 autocast, as ``dgmood train`` runs it where the CPU has bf16 units."""
    model = ScoreNet(config)
    opt = torch.optim.Adam(model.parameters())
    x, sigma = torch.rand(batch, *config.image_shape), torch.rand(batch) + 0.01
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = dsm_loss(model, x, sigma).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def ensure_run(directory: Path, data: str, steps: int) -> Run:
    """The run at ``directory``, trained first (demo settings) when it has no checkpoint."""
    run = Run(directory)
    if not (directory / "checkpoint" / "checkpoint.json").exists():
        run.create(RunConfig(data=data, train=TrainConfig(steps=steps), features=FeatureConfig(fit_n=10000)))
        run.train()
    return run


def _head(spec: str, n: int | None) -> str:
    return spec if n is None else datasets.head_spec(spec, n)


def test_sets(run: Run, n: int | None = None) -> tuple[str, dict[str, Callable[[], np.ndarray]]]:
    """The in-distribution test spec and every OOD set of a block as name → loader (the name is the cache key);
    ``n`` keeps the first n images of each set."""
    in_spec = _head(run.config.in_test or f"{run.config.data}:test", n)
    other = "mnist:test" if "fashion" in run.config.data else "fashion-mnist:test"
    source = _head(in_spec, min(SHIFT_N, n or SHIFT_N))
    sets = {spec: (lambda s=spec: run.images(s)) for spec in [_head(other, n), *(_head(s, n) if n else s
                                                                                   for s in SYNTHETIC)]}
    sets |= {f"{name}({source})": (lambda f=f: f(run.images(source))) for name, f in SHIFTS.items()}
    return in_spec, sets


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def msma_rows(run: Run, in_spec: str, sets: dict) -> tuple[dict, dict]:
    """Scores of the run's MSMA detectors on every set, and ms per image (features + detector)."""
    cache, cfg = FeatureCache(run.directory / "features", run.model_sha), run.config.features
    feats = {name: cache.get(name, cfg.sigmas(), fn, run.model, run.device, cfg.batch_size, run.progress).values
             for name, fn in {in_spec: lambda: run.images(in_spec), **sets}.items()}
    probe = torch.rand(2000, *run.config.net.image_shape)
    feature_s = _timed(lambda: score_norms(run.model, probe, cfg.sigmas(), cfg.batch_size))[1] / len(probe)
    scores, ms = {}, {}
    for name, det in run.detectors().items():
        scores[f"MSMA {name}"] = {k: det.score_samples(v) for k, v in feats.items()}
        seconds = _timed(lambda: det.score_samples(feats[in_spec]))[1] / len(feats[in_spec])
        ms[f"MSMA {name}"] = 1000 * (feature_s + seconds)
    return scores, ms


def combined_rows(run: Run, in_spec: str, sets: dict, ablate: bool) -> tuple[dict, dict, dict]:
    """Scores of the combined detector and its variants on every set, ms per image, its details.

    Variants: without the k-NN term; with ``ablate`` also without each statistic, and with the k-NN distance
    as one more mixture column instead of an added term."""
    image_det = run.image_detector("combined")
    loaders = {in_spec: lambda: run.images(in_spec), **sets}
    matrices = {name: image_det.transform(fn, name) for name, fn in loaders.items()}
    train = image_det.transform(lambda: run.images(run.fit_spec()), run.fit_spec(), training=True)
    columns = _columns(image_det, train.shape[1])
    variants = {"combined": (image_det.estimator, list(range(len(columns))))}

    def variant(drop: str, **params):
        """The default estimator's settings without the columns of ``drop`` (its one-sided term too, if it was one);
        ``distance_columns=0`` with knn kept moves the k-NN column into the mixture, before the one-sided terms."""
        keep = [i for i, name in enumerate(columns) if name != drop]
        hinge = image_det.estimator.hinge_columns if drop != "orient" else 0
        if params.get("distance_columns") == 0 and drop != "knn":
            rest, knn = [i for i in keep if columns[i] != "knn"], [i for i in keep if columns[i] == "knn"]
            keep = rest[:len(rest) - hinge] + knn + rest[len(rest) - hinge:]
        params = dict(image_det.estimator.get_params(), hinge_columns=hinge, **params)
        return CombinedDetector(**params).fit(train[:, keep]), keep

    variants["combined without knn"] = variant("knn", distance_columns=0)
    if ablate:
        variants |= {f"combined without {f}": variant(f) for f in FEATURES if f != "knn"}
        variants["combined, knn inside the mixture"] = variant("", distance_columns=0)
    seconds = dict(run.cache.seconds)
    stat_s = sum(seconds.values())
    scores, ms = {}, {}
    for label, (d, keep) in variants.items():
        scores[label] = {k: d.score_samples(m[:, keep]) for k, m in matrices.items()}
        n_in = len(matrices[in_spec])
        ms[label] = 1000 * (stat_s + _timed(lambda: d.score_samples(matrices[in_spec][:, keep]))[1] / n_in)
    det = variants["combined"][0]
    flipd = [s for s in image_det.statistics if s.name == "flipd"]
    info = {"seconds_per_image": seconds, "components": det.n_components_, "fit": run.fit_spec(),
            "sigma0": flipd[0].sigma0_ if flipd else float("nan")}
    return scores, ms, info


_FEATURE_OF = {"score_norms": "msma", "complexity": "complexity", "flipd": "flipd", "reconstruction": "reconstruction",
               "feature_knn": "fknn", "orientation": "orient", "knn": "knn", "local": "local", "field": "field",
               "pixels": "pixels"}


def _columns(image_det, n_columns: int) -> list[str]:
    """The combined feature (msma, complexity, ...) each column of the combined matrix belongs to."""
    names = [_FEATURE_OF[s.name] for s in image_det.statistics]
    widths = [max(1, len(s.columns(0))) for s in image_det.statistics]  # multi-column statistics name their own
    assert sum(widths) == n_columns
    return [f for f, w in zip(names, widths) for _ in range(w)]


def raw_rows(run: Run, in_spec: str, sets: dict, svdd_n: int) -> tuple[dict, dict, dict]:
    """Raw-pixel 5-NN (all training images) and PyOD's DeepSVDD (``svdd_n`` training images, 10 epochs)."""
    train = run.images(run.config.data)
    images = {in_spec: run.images(in_spec), **{k: fn() for k, fn in sets.items()}}
    n = sum(len(v) for v in images.values())
    knn, seconds = _timed(lambda: {k: -knn_distance(train, v, 5) for k, v in images.items()})
    scores, ms, notes = {"raw-pixel 5-NN": knn}, {"raw-pixel 5-NN": 1000 * seconds / n}, {}
    try:
        from pyod.models.deep_svdd import DeepSVDD
    except ImportError:
        notes["PyOD DeepSVDD"] = "not installed (pip install -e .[bench])"
        return scores, ms, notes
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    det = DeepSVDD(n_features=flat(train).shape[1], epochs=10, random_state=0, verbose=0)
    notes["PyOD DeepSVDD train seconds"] = _timed(lambda: det.fit(flat(train[:svdd_n])))[1]
    svdd, seconds = _timed(lambda: {k: -det.decision_function(flat(v)) for k, v in images.items()})
    scores["PyOD DeepSVDD"], ms["PyOD DeepSVDD"] = svdd, 1000 * seconds / n
    return scores, ms, notes


def block(run: Run, ablate: bool, svdd_n: int, n: int | None = None) -> dict:
    """Every detector on every set of one in-distribution: metrics, ms per image and notes."""
    in_spec, sets = test_sets(run, n)
    scores, ms = msma_rows(run, in_spec, sets)
    s, m, info = combined_rows(run, in_spec, sets, ablate)
    scores, ms = scores | s, ms | m
    s, m, notes = raw_rows(run, in_spec, sets, svdd_n)
    scores, ms = scores | s, ms | m
    results = {det: {k: evaluate(sc[in_spec], sc[k]) for k in sets} for det, sc in scores.items()}
    return {"in": in_spec, "train": run.config.data, "results": results, "ms_per_image": ms,
            "combined": info, "notes": notes}


def _short(name: str) -> str:
    return name.split("(")[0].replace("[:2000]", "").replace(":test", "")


def table(b: dict) -> str:
    """Markdown: one row per detector, AUROC per set, FPR at 95 % TPR on the natural OOD set, ms per image."""
    sets = list(next(iter(b["results"].values())))
    head = ["detector", *(f"{_short(s)} AUROC" for s in sets), f"{_short(sets[0])} FPR95", "ms/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for det, res in b["results"].items():
        cells = [f"{res[s]['auroc']:.4f}" for s in sets] + [f"{res[sets[0]]['fpr_at_95_tpr']:.2%}"]
        lines.append(f"| {det} | " + " | ".join(cells) + f" | {b['ms_per_image'][det]:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/fm-long"),
                        help="FashionMNIST score run (trained with --steps if missing)")
    parser.add_argument("--mnist-run", type=Path, default=Path("runs/mnist-score"),
                        help="MNIST score run (trained with --mnist-steps if missing); 'none' skips the MNIST block")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--steps", type=int, default=4000, help="training steps of a missing FashionMNIST run")
    parser.add_argument("--mnist-steps", type=int, default=1500, help="training steps of a missing MNIST run")
    parser.add_argument("--ablate", action="store_true", help="add leave-one-statistic-out rows of the combined detector")
    parser.add_argument("--svdd-n", type=int, default=20000, help="training images of PyOD's DeepSVDD")
    parser.add_argument("--n", type=int, default=None, help="first n images of every test set (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="where bench.md and bench.json go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = {"fashion-mnist": (args.run, args.steps), "mnist": (args.mnist_run, args.mnist_steps)}
    out = {"train images/s (batch 128)": train_throughput(NetConfig()), "threads": torch.get_num_threads(),
           "blocks": {}}
    for data, (directory, steps) in runs.items():
        if str(directory) == "none":
            continue
        run = ensure_run(directory, data, steps)
        out["blocks"][data] = block(run, args.ablate, args.svdd_n, args.n)
    text = [f"- train images/s (batch 128, {out['threads']} threads): {out['train images/s (batch 128)']:.0f}"]
    for data, b in out["blocks"].items():
        text += ["", f"### trained on {b['train']}, in-distribution {b['in']}", "", table(b), ""]
        text.append(f"- combined: {b['combined']['components']} components fitted on {b['combined']['fit']}, "
                    f"FLIPD σ₀ {b['combined']['sigma0']:.4g}; statistics ms/img: " + ", ".join(
                        f"{k} {1000 * v:.2f}" for k, v in b["combined"]["seconds_per_image"].items()))
        text += [f"- {k}: {v:.1f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in b["notes"].items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text("\n".join(text) + "\n")
    (args.out / "bench.json").write_text(json.dumps(out, indent=1, default=float))
    print("\n".join(text))


if __name__ == "__main__":
    main()
