"""MSMA benchmark: detectors vs raw-pixel baselines on FashionMNIST → MNIST/uniform/gaussian, with throughput.

Usage: ``make bench`` (or ``python benchmarks/bench.py --run runs/demo``). Reuses the run's trained
model and cached features when present (training it with the demo settings otherwise).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402
from sklearn.neighbors import NearestNeighbors

from dgmood import data as datasets
from dgmood.features import score_norms
from dgmood.losses import dsm_loss
from dgmood.metrics import evaluate
from dgmood.network import NetConfig, ScoreNet
from dgmood.report import format_table, metrics_table
from dgmood.runs import FeatureConfig, Run, RunConfig
from dgmood.train import TrainConfig

OOD = ["mnist:test", "uniform[:2000]", "gaussian[:2000]"]
IN_TEST = "fashion-mnist:test"


def train_throughput(config: NetConfig, batch: int = 128, steps: int = 15) -> float:
    """Images/s of DSM training steps (forward + backward + Adam) after 3 warm-up steps."""
    model = ScoreNet(config)
    opt = torch.optim.Adam(model.parameters())
    x, sigma = torch.rand(batch, *config.image_shape), torch.rand(batch) + 0.01
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = dsm_loss(model, x, sigma).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def feature_throughput(model, n: int = 2000) -> float:
    """Images/s for one σ level of the score-norm feature (one network call per image)."""
    x = torch.rand(n, *model.config.image_shape)
    score_norms(model, x[:200], [0.1])
    start = time.perf_counter()
    score_norms(model, x, [0.1])
    return n / (time.perf_counter() - start)


def raw_knn(train: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores of a raw-pixel 5-NN detector (brute force on flattened pixels, no standardisation)."""
    nn = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(train.reshape(len(train), -1))
    return {k: -nn.kneighbors(v.reshape(len(v), -1))[0][:, -1] for k, v in sets.items()}


def deep_svdd(train: np.ndarray, sets: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray] | None:
    """PyOD's DeepSVDD on raw pixels (10 epochs); None when PyOD is not installed."""
    try:
        from pyod.models.deep_svdd import DeepSVDD
    except ImportError:
        return None
    flat = train.reshape(len(train), -1)
    det = DeepSVDD(n_features=flat.shape[1], epochs=10, random_state=seed, verbose=0)
    det.fit(flat)
    return {k: -det.decision_function(v.reshape(len(v), -1)) for k, v in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (trained if missing)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--steps", type=int, default=1500, help="training steps when the run must be trained")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = Run(args.run)
    if not (args.run / "checkpoint" / "checkpoint.json").exists():
        run.create(RunConfig(train=TrainConfig(steps=args.steps), features=FeatureConfig(fit_n=10000)))
        run.train()
    cfg = run.config
    timing = {"train images/s (batch 128)": train_throughput(cfg.net)}
    timing["feature images/s per σ level"] = feature_throughput(run.model)

    results, scores, _ = run.evaluate(OOD, IN_TEST)
    detectors = run.detectors()
    mnist = datasets.load_images("mnist:test")
    start = time.perf_counter()
    feats = score_norms(run.model, mnist, cfg.features.sigmas(), cfg.features.batch_size)
    detectors["knn"].score_samples(feats)
    timing["seconds to score 10,000 images (features + knn)"] = time.perf_counter() - start

    train_images = datasets.load_images("fashion-mnist")
    sets = {"in": datasets.load_images(IN_TEST)} | {s: datasets.load_images(s) for s in OOD}
    start = time.perf_counter()
    raw = raw_knn(train_images, sets)
    timing["raw-pixel 5-NN seconds (60k train, all sets)"] = time.perf_counter() - start
    results["raw-pixel 5-NN"] = {s: evaluate(raw["in"], raw[s]) for s in OOD}
    start = time.perf_counter()
    svdd = deep_svdd(train_images[:20000], sets)
    if svdd is not None:
        timing["PyOD DeepSVDD seconds (20k train, 10 epochs)"] = time.perf_counter() - start
        results["PyOD DeepSVDD"] = {s: evaluate(svdd["in"], svdd[s]) for s in OOD}

    print(format_table(metrics_table(results), "markdown"))
    print()
    for key, value in timing.items():
        print(f"- {key}: {value:.1f}")
    print(f"- torch threads: {torch.get_num_threads()}, model: {cfg.net.channels}, "
          f"steps: {cfg.train.steps}, detectors fitted on {run.fit_spec()}")


if __name__ == "__main__":
    main()
