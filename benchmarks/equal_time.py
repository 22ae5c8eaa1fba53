"""Score-network architectures for 32 × 32 RGB compared at equal training time (issue 27).

Usage: ``python benchmarks/equal_time.py --seconds 180 [--data cifar10] [--threads 2] [--channels 64,128 ...]``.

For each candidate: its training images/s is measured (bf16 autocast where the CPU computes bf16 natively, as
``dgmood train`` runs it), the number of steps of 128 images that fills ``--seconds`` is taken, and the product's
own :func:`dgmood.models.train.train` trains it that long (same schedule, mirroring, EMA) on the training images.
Then the held-out denoising loss (eq. 1 of METHODS: ‖σ s(x + σε, σ) + ε‖² / 2 per image) of its EMA weights, fp32, on
the first ``--eval-n`` test images with σ and ε drawn once from a fixed seed (the training σ distribution), so
every candidate is scored on the same draws. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench import train_throughput  # noqa: E402

from dgmood.data.datasets import load_images  # noqa: E402
from dgmood.models.losses import dsm_loss  # noqa: E402
from dgmood.models.network import NetConfig  # noqa: E402
from dgmood.models.train import TrainConfig, _sigmas, native_bf16, train  # noqa: E402

CANDIDATES = {
    "(32, 64), the 28 × 28 default": (32, 64),
    "(32, 64, 128) [make bench-cifar]": (32, 64, 128),
    "(48, 96, 96)": (48, 96, 96),
    "(64, 128)": (64, 128),
}


@torch.no_grad()
def held_out_loss(model, images: torch.Tensor, cfg: TrainConfig, seed: int = 0, batch: int = 500) -> float:
    """Mean DSM loss per image of ``model`` on ``images`` (N, C, H, W), σ and ε drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    sigma = _sigmas(len(images), cfg, gen)
    noise = torch.randn(images.shape, generator=gen)
    total = sum(float(dsm_loss(model, images[i:i + batch], sigma[i:i + batch], noise[i:i + batch]).sum())
                for i in range(0, len(images), batch))
    return total / len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="training time of each candidate")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", action="append", default=[],
                        help="only these candidates, e.g. --channels 64,128 (repeatable; default: all)")
    args = parser.parse_args(argv)
    wanted = {tuple(int(c) for c in item.split(",")) for item in args.channels}
    torch.set_num_threads(args.threads)
    data_dir = os.environ.get("DGMOOD_DATA")
    train_images = load_images(args.data, data_dir)
    test_images = torch.from_numpy(load_images(f"{args.data}:test[:{args.eval_n}]", data_dir))
    amp = native_bf16("cpu")
    print(f"| architecture | parameters | train images/s | steps in {args.seconds:.0f} s | wall s | held-out loss |"
          f"  (threads={args.threads}, bf16 autocast: {amp})")
    print("|---|---:|---:|---:|---:|---:|")
    for name, channels in CANDIDATES.items():
        if wanted and channels not in wanted:
            continue
        net = NetConfig(image_shape=tuple(train_images.shape[1:]), channels=channels)
        rate = train_throughput(net, amp=amp)
        cfg = TrainConfig(steps=max(1, int(args.seconds * rate / 128)), amp=amp, hflip=True, checkpoint_every=10 ** 9)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            model = train(train_images, Path(folder), net, cfg, progress=False)
            wall = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        loss = held_out_loss(model.float().eval(), test_images, cfg)
        print(f"| {name} | {params / 1e6:.2f} M | {rate:.0f} | {cfg.steps} | {wall:.0f} | {loss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
