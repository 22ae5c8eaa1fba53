"""Training and feature throughput of candidate score-network architectures on this machine.

Usage: ``python benchmarks/architectures.py --threads 2``. Compares dgmood's ScoreNet on 2×2
patches with the same network at full resolution (patch 1) and, when diffusers is installed,
diffusers' UNet2DModel. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402

from dgmood.models.network import NetConfig, ScoreNet


class DiffusersScore(torch.nn.Module):
    """diffusers UNet2DModel (28×28, channels 32/64/64, 1 layer per block) behind ``scaled_score``."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                               block_out_channels=(32, 64, 64), norm_num_groups=8)

    def scaled_score(self, x, sigma):
        return self.net(x, sigma.log()).sample


def candidates() -> dict[str, torch.nn.Module]:
    models = {
        "ScoreNet patch 2, (48, 96, 96) [reference]": ScoreNet(NetConfig(channels=(48, 96, 96))),
        "ScoreNet patch 2, (32, 64) [default]": ScoreNet(NetConfig()),
        "ScoreNet patch 1 (full res), (24, 48, 48)": ScoreNet(NetConfig(channels=(24, 48, 48), patch=1)),
        "ScoreNet patch 1 (full res), (32, 64, 64)": ScoreNet(NetConfig(channels=(32, 64, 64), patch=1)),
    }
    try:
        models["diffusers UNet2DModel (32, 64, 64)"] = DiffusersScore()
    except ImportError:
        pass
    return models


def measure(model, batch: int = 128, steps: int = 8, feature_batch: int = 500) -> tuple[float, float]:
    """(training images/s, feature images/s per σ level) after warm-up."""
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    x, sigma = torch.rand(batch, 1, 28, 28), torch.rand(batch) + 0.01
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = (model.scaled_score(x, sigma) + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_rate = batch * steps / (time.perf_counter() - start)
    xf, sf = torch.rand(feature_batch, 1, 28, 28), torch.full((feature_batch,), 0.1)
    with torch.no_grad():
        model.scaled_score(xf, sf)
        start = time.perf_counter()
        for _ in range(3):
            model.scaled_score(xf, sf)
    return train_rate, 3 * feature_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"| architecture | parameters | train images/s | feature images/s per σ |  (threads={args.threads})")
    print("|---|---:|---:|---:|")
    for name, model in candidates().items():
        n = sum(p.numel() for p in model.parameters())
        train_rate, feature_rate = measure(model)
        print(f"| {name} | {n / 1e6:.2f} M | {train_rate:.0f} | {feature_rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
