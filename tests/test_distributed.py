"""Data-parallel training and sharded features under torchrun: real 2-process gloo jobs on the CPU.

Each job is ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m dgmood -- CMD ...``
(the ``--`` ends torchrun's own options: without it torchrun's argument parser stops at dgmood's
``--run``, an ambiguous abbreviation of its ``--run-path``).

What the 2-process runs must reproduce, and to what tolerance:

* Training: ``--batch-size`` is the global batch. Both processes draw the same global batch and all
  its noise (σ, ε) from the same seeded generator, as one process does, and each computes the loss of
  its half; DDP averages the two half-batch gradients. So 2 processes × 16 images follow 1 process ×
  32 images exactly but for float rounding: the gradient is summed in another order (two halves, then
  their mean), a relative difference of about float32's epsilon (1e-7), which Adam carries and
  amplifies a little over the steps (measured over 8 steps, in which the loss falls from 393 to 356
  and weights move by up to 0.07: 1e-7 relative on the loss, 2e-6 absolute on weights and Adam
  moments). The test allows 1e-5 relative on the loss and 2e-5 absolute on the tensors; the generator
  state, which sees no arithmetic, must be bitwise equal. A control shows the tolerance is tight:
  1 process at 16 images lands far outside it (about 1 % on the loss).
* Features: each process scores a contiguous shard; only the network's batch composition differs,
  so the gathered matrix equals the single-process one to float tolerance (rtol 1e-5).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import dgmood.utils.distributed as dist
from dgmood.models.checkpoint import META, STATE, WEIGHTS
from dgmood.app.cli import main
from dgmood.models.flow import FlowConfig, ImageFlow
from dgmood.models.registry import training_loss
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.app.runs import Run
from dgmood.models.train import TrainConfig, _global_draws, _ShardLoss, _sigmas, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")

# a high peak rate (warm-up is 100 steps, so step k runs at LR·(k+1)/100) moves the weights visibly
TRAIN_DATA, BATCH, STEPS, LR = "fashion-mnist[:512]", 32, 8, 0.2
FEATURE_SPECS = ("fashion-mnist:test[:301]", "uniform[:5]")  # odd sizes: shards of 151/150 and 3/2 images
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dgmood", "--"]


def _train_args(run: Path, batch: int = BATCH) -> list[str]:
    return ["train", "--run", str(run), "--data", TRAIN_DATA, "--channels", "8,16", "--steps", str(STEPS),
            "--batch-size", str(batch), "--lr", str(LR), "--checkpoint-every", "1", "--threads", "1", "--quiet",
            "--no-amp"]  # fp32: the tolerances below are float32's (bf16, the default on some CPUs, rounds far more)


def _torchrun(args: list[str], data_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DGMOOD_DATA": str(data_dir)}
    start = time.perf_counter()
    done = subprocess.run([*TORCHRUN, *args], env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    return done, seconds


def _invoke(args: list[str], data_dir: Path):
    result = CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict:
    """A 2-process run (torchrun), the same run in one process, and the control: one process at half the batch."""
    root = tmp_path_factory.mktemp("ddp")
    done, seconds = _torchrun(_train_args(root / "two"), data_dir)
    print(f"2-process training: {seconds:.1f} s")
    _invoke(_train_args(root / "one"), data_dir)
    _invoke(_train_args(root / "half", batch=BATCH // 2), data_dir)
    return {"two": root / "two", "one": root / "one", "half": root / "half", "stdout": done.stdout}


def _log(run: Path) -> list[dict]:
    return json.loads((run / "checkpoint" / META).read_text())["log"]


# --- (a) 2 processes × B = 1 process × 2B ----------------------------------------------------------


def test_two_processes_follow_one_process_at_the_same_global_batch(runs):
    two, one = _log(runs["two"]), _log(runs["one"])
    assert [e["step"] for e in two] == [e["step"] for e in one] == list(range(1, STEPS + 1))
    loss_two, loss_one = np.array([e["loss"] for e in two]), np.array([e["loss"] for e in one])
    print("loss, 2 processes:", loss_two.round(4), "\nloss, 1 process:  ", loss_one.round(4))
    np.testing.assert_allclose(loss_two, loss_one, rtol=LOSS_RTOL)
    meta = json.loads((runs["two"] / "checkpoint" / META).read_text())
    assert meta["processes"] == 2 and meta["train"]["batch_size"] == BATCH
    for name in (WEIGHTS, STATE):  # EMA weights; raw weights, Adam moments and step, generator state
        a, b = load_file(str(runs["two"] / "checkpoint" / name)), load_file(str(runs["one"] / "checkpoint" / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        print(f"{name}: largest difference {worst:.2e}")
        assert worst <= WEIGHT_ATOL, (name, worst)
        if name == STATE:
            assert torch.equal(a["rng.generator"], b["rng.generator"])  # the same draws, all of them
    # only rank 0 printed, and the folder holds nothing but the committed checkpoint
    assert runs["stdout"].count("trained in") == 1, runs["stdout"]
    assert sorted(os.listdir(runs["two"] / "checkpoint")) == sorted([META, STATE, WEIGHTS])


def test_control_one_process_at_half_the_batch_differs_by_far_more(runs):
    loss_one = np.array([e["loss"] for e in _log(runs["one"])])
    loss_half = np.array([e["loss"] for e in _log(runs["half"])])
    gap = np.max(np.abs(loss_half / loss_one - 1))
    print(f"1 process at half the batch: loss differs by up to {gap:.1%}")
    assert gap > 100 * LOSS_RTOL


@pytest.mark.parametrize("kind", ["score", "flow"])
def test_shard_losses_average_to_the_single_process_loss_and_gradient(kind):
    """The pieces of the 2-process path, in one process: the same draws as training_loss, and shard losses
    (uneven: 16 + 15 images) whose mean and mean gradient are the full batch's."""
    cfg = TrainConfig(seed=5)
    torch.manual_seed(0)
    if kind == "score":
        model = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8, 16), emb_dim=8))
        torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # a non-zero head, so every layer gets a gradient
    else:  # training_loss initialises the ActNorms on the full batch, as _ddp does before the first step
        model = ImageFlow(FlowConfig(image_shape=(1, 8, 8), levels=1, steps=1, hidden=8, bins=4))
    x = torch.rand(31, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    full = training_loss(model, x, functools.partial(_sigmas, cfg=cfg, generator=g1), g1)
    full_grad = torch.autograd.grad(full, list(model.parameters()))
    inputs = _global_draws(model, x, cfg, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    losses, grads = [], []
    for part in range(2):
        lo, hi = dist.shard(len(x), part, 2)
        loss = _ShardLoss(model)(tuple(t[lo:hi] for t in inputs), 2 / len(x))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close((losses[0] + losses[1]) / 2, full, rtol=1e-6, atol=0)
    # float rounding of sums of 31 vs 16 + 15 terms, some cancelling: relative to the gradient's scale
    scale = max(float(g.abs().max()) for g in full_grad)
    for g, a, b in zip(full_grad, *grads):
        torch.testing.assert_close((a + b) / 2, g, rtol=0, atol=1e-5 * scale)


def test_shard_bounds_are_contiguous_and_balanced():
    for n in (0, 1, 5, 31, 301):
        for parts in (1, 2, 3, 8):
            bounds = [dist.shard(n, p, parts) for p in range(parts)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# --- (b) sharded features ----------------------------------------------------------------------------


def test_sharded_features_equal_single_process_features(runs, data_dir, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(runs["two"], single)  # the same weights, no features yet
    args = ["features", "--run", str(runs["two"]), *[a for s in FEATURE_SPECS for a in ("--data", s)],
            "--threads", "1", "--quiet"]
    done, seconds = _torchrun(args, data_dir)
    print(f"2-process features: {seconds:.1f} s")
    for spec in FEATURE_SPECS:
        assert done.stdout.count(f"{spec}:") == 1, done.stdout  # rank 0 alone reports
    run, reference = Run(runs["two"], progress=False), Run(single, data_dir=data_dir, progress=False)
    files = sorted(p.name for p in (runs["two"] / "features").iterdir())
    assert len(files) == len(FEATURE_SPECS) and not [f for f in files if f.startswith(".")], files
    for spec in FEATURE_SPECS:
        sharded, expected = run.features(spec), reference.features(spec)  # the first loads, the second computes
        assert sharded.meta["processes"] == 2 and sharded.meta["n"] == expected.meta["n"] == len(sharded.values)
        assert sharded.columns == expected.columns and sharded.meta["model_sha256"] == expected.meta["model_sha256"]
        np.testing.assert_allclose(sharded.values, expected.values, rtol=1e-5)
    assert sorted(p.name for p in (single / "features").iterdir()) == files  # the same cache keys


# --- (c) misconfiguration ------------------------------------------------------------------------------


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process looks like rank 0 of a 2-process torchrun job (no process group is started)."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)


def test_commands_without_torchrun_support_refuse_it(torchrun_env, tmp_path):
    assert dist.launched()
    for command in ("fit", "evaluate", "report"):
        result = CliRunner().invoke(main, [command, "--run", str(tmp_path / "run")])
        assert result.exit_code == 1
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "does not run under torchrun" in lines[0] and f"dgmood {command}" in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without enough GPUs")
def test_more_processes_than_gpus_is_a_clear_error(torchrun_env):
    with pytest.raises(ValueError, match="but 0 CUDA GPU.* are visible; use --device cpu"):
        dist.init("cuda")
    assert not torch.distributed.is_initialized()


def test_a_batch_smaller_than_the_processes_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    images = np.zeros((10, 1, 8, 8), np.float32)
    net = NetConfig(image_shape=(1, 8, 8), channels=(8, 16), emb_dim=8)
    with pytest.raises(ValueError, match="cannot be split over 3 processes; use a larger --batch-size"):
        train(images, tmp_path, net, TrainConfig(steps=1, batch_size=2), progress=False)
