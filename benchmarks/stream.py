"""Streaming benchmark (issue 25): `dgmood predict` on a folder of 100,000 JPEGs of 256×256 with a 32×32 RGB model,
every figure measured side by side in one run.

Usage: ``python benchmarks/stream.py [--n 100000] [--size 256] [--threads 2] [--out runs/bench-stream]``
(``make bench`` runs it).

Makes (once, cached in ``OUT/jpegs``) ``--n`` JPEGs of ``--size``² pixels in folders of 1,000: CIFAR-10 test images
upscaled (bicubic) and saved at quality 90, so they compress like photographs. Trains a small 32×32 RGB score model
(``OUT/run``, cached) and fits its ``--method`` detector on CIFAR-10 test images. Then prints and writes
``OUT/stream.json``:
- decoding alone, images/s: the product's loader (a thread pool, :mod:`dgmood.data.stream`) and torch's
  DataLoader with worker processes on the same files, over the first ``--decode-n`` images;
- the network alone (the detector's statistics on decoded images already in memory), images/s;
- the whole `dgmood predict` in a fresh process on the first ``--whole-n`` images (default all): images/s, and its
  peak resident memory;
- the same `dgmood predict` with decoding in worker processes (``DGMOOD_DECODE=processes``) instead of threads;
- the same `dgmood predict` on those images already decoded (an .npy of them at 32×32: no decoding, the same
  network, explanations and CSV): what decoding adds to the whole, against what it costs alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402

DATA = os.environ.get("DGMOOD_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def _write_block(args: tuple[str, int, int, int]) -> int:
    """Write JPEGs ``start..stop`` into ``folder`` (a worker process); returns how many."""
    from PIL import Image

    from dgmood.data.datasets import load_images

    folder, start, stop, size = args
    base = (load_images(f"cifar10:test[{start % 10000}:{(start % 10000) + (stop - start)}]", DATA) * 255)
    base = base.round().astype(np.uint8).transpose(0, 2, 3, 1)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(base):
        Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).save(out / f"{start + i:06d}.jpg",
                                                                                  quality=90)
    return len(base)


def make_jpegs(root: Path, n: int, size: int, workers: int) -> Path:
    """``root`` with ``n`` JPEGs in sub-folders of 1,000 (made once; a complete set is reused)."""
    marker = root / f".complete-{n}-{size}"
    if marker.is_file():
        return root
    blocks = [(str(root / f"{s // 1000:03d}"), s, min(n, s + 1000), size) for s in range(0, n, 1000)]
    with ProcessPoolExecutor(workers) as pool:
        made = sum(pool.map(_write_block, blocks))
    marker.write_text(str(made))
    return root


def prepare_run(run: Path, method: str, threads: int) -> None:
    """A 32×32 RGB score model (default architecture, 200 steps) and its fitted ``method`` detector, once."""
    cli = [sys.executable, "-m", "dgmood"]
    if not (run / "checkpoint" / "weights.safetensors").is_file():
        subprocess.run([*cli, "train", "--run", str(run), "--data", "cifar10:test[:5000]", "--in", "cifar10:test[5000:]",
                        "--steps", "200", "--fit-n", "2000", "--threads", str(threads), "--quiet"], check=True)
    subprocess.run([*cli, "fit", "--run", str(run), "--method", method, "--threads", str(threads), "--quiet"],
                   check=True)


def decode_rate(folder: Path, n: int) -> float:
    """Images/s of the product's streaming loader (thread pool) bringing the first ``n`` images to 32×32."""
    from dgmood.data.datasets import iter_chunks

    start = time.perf_counter()
    count = sum(len(c.images) for c in iter_chunks(f"{folder}[:{n}]", (3, 32, 32)))
    return count / (time.perf_counter() - start)


class _Files:
    """A map-style dataset of image files for torch's DataLoader (decoded by :func:`dgmood.data.images.decode`)."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from dgmood.data.images import ImagePolicy, decode

        return decode(self.files[i].read_bytes(), str(self.files[i]), ImagePolicy((3, 32, 32)))[0]


def dataloader_rate(folder: Path, n: int, workers: int) -> float:
    """Images/s of torch's DataLoader with ``workers`` processes decoding the same files in batches of 1,024."""
    import torch

    files = sorted(folder.rglob("*.jpg"))[:n]
    loader = torch.utils.data.DataLoader(_Files(files), batch_size=1024, num_workers=workers, prefetch_factor=2,
                                         collate_fn=np.stack)
    start = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    return count / (time.perf_counter() - start)


def network_rate(run: Path, method: str, folder: Path, n: int = 2048) -> float:
    """Images/s of the detector's statistics on ``n`` decoded images already in memory (after one warm-up)."""
    import dgmood
    from dgmood.data.datasets import load_images

    det = dgmood.load(run, method)
    x = load_images(f"{folder}[:{n}]", shape=det.image_shape)
    det.score(x[:64])
    start = time.perf_counter()
    det.score(x)
    return len(x) / (time.perf_counter() - start)


def whole(run: Path, method: str, folder: str, out: Path, threads: int, decode: str = "threads"
          ) -> tuple[float, float, int]:
    """(seconds, peak resident MB, images) of `dgmood predict` on a spec in a fresh process (decoding by
    ``decode``: threads or processes)."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
            "sys.stderr.write(r.stderr[-2000:])")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "dgmood", "predict", "--run", str(run), str(folder),
           "--method", method, "--out", str(out), "--threads", str(threads), "--quiet"]
    env = dict(os.environ, DGMOOD_DECODE=decode)
    seconds, rss_kb, rc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"dgmood predict failed with status {rc}")
    with open(out) as f:
        rows = sum(1 for _ in f) - 1
    return float(seconds), int(rss_kb) / 1024, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--decode-n", type=int, default=10_000)
    p.add_argument("--whole-n", type=int, default=0, help="Images of the whole predict (0: all).")
    p.add_argument("--method", default="msma-knn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-stream"))
    a = p.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), DGMOOD_DATA=DATA)
    import torch

    torch.set_num_threads(a.threads)
    folder = make_jpegs(a.out / f"jpegs-{a.size}", a.n, a.size, a.threads)
    run = a.out / "run"
    prepare_run(run, a.method, a.threads)
    decode_n = min(a.decode_n, a.n)
    threads_rate = decode_rate(folder, decode_n)
    processes_rate = dataloader_rate(folder, decode_n, a.threads)
    net = network_rate(run, a.method, folder)
    spec = f"{folder}[:{a.whole_n}]" if a.whole_n else str(folder)
    seconds, peak_mb, rows = whole(run, a.method, spec, a.out / "verdicts.csv", a.threads)
    serial = rows / threads_rate + rows / net
    decoded = a.out / f"decoded-{rows}.npy"
    if not decoded.is_file():
        from dgmood.data.datasets import load_images

        np.save(decoded, (load_images(spec, shape=(3, 32, 32)) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))
    npy_seconds = whole(run, a.method, str(decoded), a.out / "verdicts-npy.csv", a.threads)[0]
    proc_seconds, proc_mb, _ = whole(run, a.method, spec, a.out / "verdicts-proc.csv", a.threads, "processes")
    added = seconds - npy_seconds
    result = {"images": rows, "size": a.size, "model": "32x32x3", "method": a.method, "threads": a.threads,
              "decode_threads_per_s": round(threads_rate, 1), "decode_dataloader_per_s": round(processes_rate, 1),
              "network_per_s": round(net, 1), "predict_per_s": round(rows / seconds, 1),
              "predict_seconds": round(seconds, 1), "predict_peak_mb": round(peak_mb), "serial_seconds": round(serial, 1),
              "predict_decoded_seconds": round(npy_seconds, 1), "decoding_added_seconds": round(added, 1),
              "decoding_alone_seconds": round(rows / threads_rate, 1), "predict_processes_seconds": round(proc_seconds, 1),
              "predict_processes_peak_mb": round(proc_mb)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "stream.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"dgmood predict on {rows:,} JPEGs of {a.size}x{a.size}, 32x32x3 model, {a.method}, {a.threads} threads")
    print(f"  decoding alone:   {threads_rate:8.0f} images/s (thread pool, the product's loader)")
    print(f"                    {processes_rate:8.0f} images/s (torch DataLoader, {a.threads} worker processes)")
    print(f"  network alone:    {net:8.0f} images/s")
    print(f"  whole predict:    {rows / seconds:8.0f} images/s ({seconds:.0f} s; decoding then network one after the "
          f"other: {serial:.0f} s, {serial / seconds:.2f}x)")
    print(f"  with decoding in worker processes: {rows / proc_seconds:8.0f} images/s ({proc_seconds:.0f} s, peak "
          f"{proc_mb:.0f} MB)")
    print(f"  on the same images already decoded (.npy): {npy_seconds:.0f} s: decoding added {added:.0f} s to the "
          f"whole, against {rows / threads_rate:.0f} s alone")
    print(f"  peak memory:      {peak_mb:8.0f} MB (target < 1,500)")


if __name__ == "__main__":
    main()
