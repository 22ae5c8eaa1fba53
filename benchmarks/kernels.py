"""int8 against fp32 for the k-NN search on this machine (issue 26): the product alone and the whole search.

Usage: ``python benchmarks/kernels.py [--shape 1024 784 4096] [--threads 1 2] [--repeats 5] [--bank 20000]``

For each thread count prints the min over ``--repeats`` (after a warm-up) of
- ``torch._int_mm`` of (N, D) int8 levels by their (D, M) transpose, and the fp32 product of the same values,
  the issue's shape by default (1024x784 by 784x4096);
- :func:`dgmood.statistics.neighbours.kneighbors` (k = 5) of N random 8-bit images against ``--bank`` of them,
  forced to each kernel by ``DGMOOD_KERNELS``;
then the CPU's flags and the kernel ``dgmood`` chooses here (``dgmood info``).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from dgmood.statistics.neighbours import kneighbors
from dgmood.utils import kernels


def best_ms(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up, milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def products(n: int, d: int, m: int, repeats: int) -> tuple[float, float]:
    """(int8, fp32) ms of the (n, d) by (d, m) product."""
    gen = torch.Generator().manual_seed(0)
    q8 = torch.randint(-128, 128, (n, d), dtype=torch.int8, generator=gen)
    b8 = torch.randint(-128, 128, (m, d), dtype=torch.int8, generator=gen)
    q32, b32 = q8.float(), b8.float()
    return best_ms(lambda: torch._int_mm(q8, b8.T), repeats), best_ms(lambda: q32 @ b32.T, repeats)


def searches(n: int, d: int, bank_n: int, repeats: int) -> tuple[float, float]:
    """(int8, fp32) ms of the 5-NN of n 8-bit images among bank_n, each kernel forced by the override."""
    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, (bank_n, d), dtype=np.uint8)
    queries = rng.integers(0, 256, (n, d)).astype(np.float32) / 255.0
    times = []
    for kernel in ("int8", "fp32"):
        os.environ[kernels.ENV] = f"knn={kernel}"
        times.append(best_ms(lambda: kneighbors(bank, queries, 5), repeats))
    os.environ.pop(kernels.ENV)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[1024, 784, 4096], metavar=("N", "D", "M"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bank", type=int, default=20000, help="Bank rows of the whole search (0 skips it).")
    args = parser.parse_args()
    n, d, m = args.shape
    print(f"| threads | int8 {n}x{d} by {d}x{m} | fp32 | fp32 / int8 | 5-NN of {n} among {args.bank}: int8 | fp32 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        int8, fp32 = products(n, d, m, args.repeats)
        search = "| – | – |"
        if args.bank:
            s8, s32 = searches(n, d, args.bank, max(1, args.repeats // 2))
            search = f"| {s8:.0f} ms | {s32:.0f} ms |"
        print(f"| {threads} | {int8:.1f} ms | {fp32:.1f} ms | {fp32 / int8:.2f}x {search}")
    print("\n".join(kernels.describe()))


if __name__ == "__main__":
    main()
