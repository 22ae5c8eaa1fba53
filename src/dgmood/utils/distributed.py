"""Process-group helpers for jobs launched by ``torchrun`` (gloo on CPU, NCCL on CUDA).

Every helper also works in a plain single process: rank 0 of a world of size 1, barriers and
gathers are no-ops. ``dgmood train`` and ``dgmood features`` run under

    torchrun --nproc_per_node=N -m dgmood -- train --run DIR ...

where training splits each (global) batch across the N processes and wraps the network in
DistributedDataParallel, and features split the images into N contiguous shards. The ``--`` ends
torchrun's own options: without it torchrun's argument parser stops at dgmood's ``--run``, which it
takes for an ambiguous abbreviation of its ``--run-path`` (torch 2.13, Python 3.11).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["all_gather_arrays", "barrier", "destroy", "end_worker", "gather_shards", "init", "is_main", "launched",
           "local_world_size", "rank", "shard", "world_size"]

_TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))) if launched() else 1


def init(device: torch.device | str = "cpu") -> torch.device:
    """Join the torchrun job's process group (a no-op outside torchrun or when already joined).

    The backend is NCCL for a CUDA ``device``, where each process takes the GPU of its LOCAL_RANK,
    and gloo otherwise. The group is left at interpreter exit.

    Returns:
        The device this process computes on.
    """
    device = torch.device(device)
    if not launched():
        return device
    if device.type == "cuda":
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            fix = f"use --nproc_per_node {count} or --device cpu" if count else "use --device cpu"
            raise ValueError(f"torchrun started process {local} on this machine but {count} CUDA GPU(s) are "
                             f"visible; {fix}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(destroy)
    return device


def destroy() -> None:
    """Leave the process group (no-op when not in one), after freeing what still holds it (a DDP reducer)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def end_worker() -> None:
    """End a torchrun worker whose work succeeded: wait for the others, leave the group, flush, and exit
    with status 0 without interpreter teardown, where torch's C++ thread pools can abort (as ``dgmood
    serve`` does). Every file was written and closed before; no-op outside torchrun."""
    if not launched():
        return
    barrier()
    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the job (0 outside a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes in the job (1 outside a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this is rank 0: the one process that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if world_size() > 1:
        dist.barrier()


def shard(n: int, part: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """Bounds [lo, hi) of contiguous shard ``part`` (default: this rank) of ``n`` items split into
    ``parts`` (default: the world size) shards whose sizes differ by at most one, larger ones first."""
    part, parts = rank() if part is None else part, world_size() if parts is None else parts
    size, extra = divmod(n, parts)
    lo = part * size + min(part, extra)
    return lo, lo + size + (part < extra)


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_arrays(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's ``array``, in rank order, on every rank (no pickling: shapes, then padded data).

    Arrays may differ in their shapes (not in ndim) but must share one dtype that torch supports.
    """
    array = np.ascontiguousarray(array)
    if world_size() == 1:
        return [array]
    device, world = _comm_device(), world_size()
    shape = torch.tensor(array.shape, dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [tuple(int(v) for v in s.cpu()) for s in shapes]
    longest = max(1, max(int(np.prod(s)) for s in shapes))
    flat = torch.zeros(longest, dtype=torch.from_numpy(array.reshape(-1)).dtype, device=device)
    flat[: array.size] = torch.from_numpy(array.reshape(-1)).to(device)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return [g[: int(np.prod(s))].cpu().numpy().reshape(s) for g, s in zip(gathered, shapes)]


def gather_shards(fn, items) -> np.ndarray:
    """``fn`` applied to this rank's contiguous :func:`shard` of ``items``, concatenated in rank order
    on every rank; for a single process simply ``fn(items)``.

    Arguments:
        fn: Maps a slice of ``items`` of length n to an array of shape (n, ...).
        items: Anything sliceable with a length (e.g. images of shape (N, C, H, W)).

    Returns:
        Array of shape (N, ...).
    """
    if world_size() == 1:
        return fn(items)
    lo, hi = shard(len(items))
    return np.concatenate(all_gather_arrays(fn(items[lo:hi])))
