"""A thin, resumable trainer for the score model (DSM loss) or the image flow (bits/dim): Adam, EMA, checkpoints;
data-parallel (DDP) under torchrun."""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from dgmood.utils import distributed as dist
from dgmood.utils import kernels
from dgmood.utils.progress import progress_bar
from dgmood.models.checkpoint import META, load_checkpoint, save_checkpoint
from dgmood.models.perturb import perturb
from dgmood.models.flow import ImageFlow
from dgmood.models.losses import sample_sigmas
from dgmood.models.registry import build_model, draw_inputs, per_image_loss, training_loss

__all__ = ["TrainConfig", "default_amp", "ema_decay", "learning_rate", "native_bf16", "random_hflip", "read_train_log",
           "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train`. σ values are on the [0, 1] pixel scale.

    Attributes:
        steps: Optimiser steps in total (a resumed run continues up to this count).
        batch_size: Images per step, over all processes together under torchrun (each takes a slice).
        lr: Peak Adam learning rate, reached after ``warmup`` steps, then cosine decay to lr/20.
        warmup: Linear warm-up steps.
        ema_decay: Decay of the weight EMA used for every evaluation.
        sigma_min, sigma_max: Range of training noise levels (wide band).
        focus_weight: Share of σ drawn log-uniformly on MSMA's band [0.01, 1].
        grad_clip: Max global gradient norm.
        checkpoint_every: Steps between checkpoints (at most this much work is lost on a crash).
        seed: Seed of the data order, σ and ε draws, and the initial weights.
        amp: Mixed precision for the score network: its forward pass under bfloat16 autocast (fp32 weights,
            optimizer and loss reduction; bf16 has fp32's range, so no loss scaling). Worth it where the device
            computes bf16 natively (:func:`native_bf16`; the command line turns it on there); the flow always
            trains in fp32 (its log-determinants sum thousands of terms).
        perturb: Pixel perturbation rate μ of a likelihood-ratio background model (Ren et al. 2019): each
            pixel of each training batch is replaced by a uniform 8-bit level with probability μ; 0 = off.
        hflip: Mirror each training image left-right with probability 1/2 (drawn from the run's generator, so a
            resumed run sees the same batches): the model then treats a mirrored photograph as the original.
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    focus_weight: float = 0.75
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    seed: int = 0
    perturb: float = 0.0
    amp: bool = False
    hflip: bool = False


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay from ``cfg.lr`` to ``cfg.lr / 20`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs are seeded permutations, so a resumed run sees the same."""
    per_epoch = n // batch_size if n >= batch_size else 1
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


def ema_decay(step: int, decay: float) -> float:
    """EMA decay at ``step`` (0-based), warmed up as min(decay, (1 + step) / (10 + step)) so the
    average forgets the random initial weights within the first few hundred steps."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _sigmas(n: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    return sample_sigmas(n, cfg.sigma_min, cfg.sigma_max, focus_weight=cfg.focus_weight, generator=generator)


def random_hflip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``batch`` (N, C, H, W) with each image mirrored left-right with probability 1/2 (N draws from ``generator``)."""
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def _setup(net_config, cfg: TrainConfig, device: torch.device):
    torch.manual_seed(cfg.seed)
    model = build_model(net_config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    return model, ema, optimizer, generator


class _ShardLoss(torch.nn.Module):
    """This process's part of the mean loss of a global batch of G images: the sum of the per-image
    loss over its shard times ``weight`` = world size / G, so that DDP's average of the gradients over
    the processes is the gradient of the mean over all G images, even when shards differ in size.
    DDP wraps this module, so that its forward holds the whole loss computation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: tuple[torch.Tensor, ...], weight: float) -> torch.Tensor:
        return per_image_loss(self.model, inputs).sum() * weight


def _global_draws(model, x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The random inputs of the loss of the global batch ``x`` (G, C, H, W), drawn from ``gen`` exactly as
    :func:`dgmood.models.registry.training_loss` draws them in a single process. Every process draws them all, so
    each one's generator stays equal to the single-process one."""
    return draw_inputs(model, x, functools.partial(_sigmas, cfg=cfg, generator=gen), gen)


def _ddp(model: torch.nn.Module, first: tuple[torch.Tensor, ...], device: torch.device):
    """``model``'s loss wrapped in DistributedDataParallel. A flow's data-dependent ActNorm
    initialisation sees the whole first global batch ``first`` first, on every process alike, as in
    a single process."""
    if isinstance(model, ImageFlow) and any(not bool(b) for n, b in model.named_buffers() if n.endswith("initialized")):
        with torch.no_grad():
            model.log_prob(first[0].to(device))
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(_ShardLoss(model), device_ids=ids)


def _shard_loss(ddp, inputs: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    """This process's part (see :class:`_ShardLoss`) of the loss of a global batch's ``inputs``."""
    lo, hi = dist.shard(len(inputs[0]))
    return ddp(tuple(t[lo:hi].to(device) for t in inputs), dist.world_size() / len(inputs[0]))


def native_bf16(device="cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX units. There the score network trains ~1.4× faster under bf16 autocast at the same detection AUROCs
    (2 cores with AVX512-BF16, docs/results.md); CPUs without them emulate bf16, slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bool(kernels.native_bf16_units())


def default_amp(device="cpu") -> bool:
    """The default of ``dgmood train --amp``: ``DGMOOD_KERNELS=amp=on|off`` where set, else :func:`native_bf16`
    (:mod:`dgmood.utils.kernels`)."""
    forced = kernels.overrides().get("amp")
    return forced == "on" if forced else native_bf16(device)


def _autocast(model, cfg: TrainConfig, device: torch.device):
    """bfloat16 autocast around the score network's loss when ``cfg.amp`` (never for the flow)."""
    enabled = cfg.amp and not isinstance(model, ImageFlow)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _resume(checkpoint_dir: Path, model, ema, optimizer, gen) -> dict:
    """The meta of the checkpoint in ``checkpoint_dir`` restored into the training state, or that of
    step 0. Under torchrun rank 0 loads first, since its load may finish a save cut short."""
    if not dist.is_main():
        dist.barrier()
    meta = {"step": 0, "log": []}
    if (checkpoint_dir / META).exists():
        meta = load_checkpoint(checkpoint_dir, model, ema, optimizer, gen)
    if dist.is_main():
        dist.barrier()
    return meta


def _mean_over_processes(values: list[float]) -> float:
    """Mean of ``values`` over this process's steps, averaged over the processes (equal step counts)."""
    mean = np.mean(values)
    if dist.world_size() == 1:
        return float(mean)
    return float(np.mean(np.concatenate(dist.all_gather_arrays(np.array([mean], dtype=np.float64)))))


def train(
    images: np.ndarray,
    checkpoint_dir: Path,
    net_config,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    data_name: str = "",
    progress: bool = True,
) -> torch.nn.Module:
    """Train (or resume training of) a score model by DSM, or an image flow by maximum likelihood, on ``images``.

    Arguments:
        images: Training set, float32 of shape (N, C, H, W) in [0, 1].
        checkpoint_dir: Where checkpoints go; an existing checkpoint there is resumed.
        net_config, cfg: Architecture (a NetConfig or a FlowConfig) and optimisation settings.
        device: Torch device for the network.
        data_name: Name of the training set, stored in the checkpoint.

    Returns:
        The EMA model in eval mode.

    In a torchrun job (a process group joined, see :mod:`dgmood.utils.distributed`) every process draws the
    same global batch of ``cfg.batch_size`` images and all its noise, computes the loss of its
    contiguous slice through DistributedDataParallel, and rank 0 alone writes checkpoints (the others
    wait). N processes thus follow the single-process run at the same batch size up to float rounding
    (gradients summed in another order); a run may resume with another number of processes.
    """
    device = torch.device(device)
    model, ema, optimizer, gen = _setup(net_config, cfg, device)
    checkpoint_dir = Path(checkpoint_dir)
    meta = _resume(checkpoint_dir, model, ema, optimizer, gen)
    step, log = meta["step"], meta["log"]
    data = torch.from_numpy(np.ascontiguousarray(images))
    world, ddp = dist.world_size(), None
    if world > 1 and min(len(data), cfg.batch_size) < world:
        raise ValueError(f"a batch of {min(len(data), cfg.batch_size)} images cannot be split over {world} processes; "
                         "use a larger --batch-size or fewer processes")
    bar = progress_bar(total=cfg.steps, initial=step, desc="train", unit="step", enabled=progress and dist.is_main())
    window, t0, seen = [], time.perf_counter(), 0
    while step < cfg.steps:
        idx = _batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        batch = random_hflip(data[idx], gen) if cfg.hflip else data[idx]
        batch = perturb(batch, cfg.perturb, gen) if cfg.perturb > 0 else batch
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with _autocast(model, cfg, device):
            if world == 1:
                x = batch.to(device)
                loss = training_loss(model, x, functools.partial(_sigmas, cfg=cfg, generator=gen), gen)
            else:
                inputs = _global_draws(model, batch, cfg, gen)
                ddp = _ddp(model, inputs, device) if ddp is None else ddp
                loss = _shard_loss(ddp, inputs, device)
        loss = loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        _update_ema(ema, model, ema_decay(step, cfg.ema_decay))
        step, seen = step + 1, seen + len(idx)
        window.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window[-50:]):.2f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            rate = seen / (time.perf_counter() - t0)
            log.append({"step": step, "loss": _mean_over_processes(window), "images_per_s": rate})
            window = []
            if dist.is_main():
                save_checkpoint(checkpoint_dir, model, ema, optimizer, gen, {
                    "step": step, "log": log, "train": asdict(cfg), "data": data_name, "processes": world,
                })
            dist.barrier()
    bar.close()
    return ema.eval()


def read_train_log(checkpoint_dir: Path) -> list[dict]:
    """The loss/throughput log stored in a checkpoint: one dict per checkpoint interval."""
    return json.loads((Path(checkpoint_dir) / META).read_text())["log"]
