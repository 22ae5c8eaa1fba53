"""Speed benchmark of the default detector (issue 11), every figure measured side by side in one run.

Usage: ``python benchmarks/speed.py --run runs/demo [--n 10000] [--threads 2] [--out runs/bench-speed]``
(``make bench`` runs it on the demo's model).

Prints and writes ``OUT/speed.json`` and ``OUT/speed.md``:
- fp32 matmul GFLOP/s (2048 × 2048) and the score network's forward GFLOP/s at the batch size the statistics
  use (FLOPs counted by ``torch.utils.flop_counter``), run as the default detector runs it (ONNX Runtime where
  installed) and as the PyTorch module, and the first's ratio to the matmul;
- training images/s (forward + backward + Adam, batch 128) of the run's architecture, fp32 and, where the CPU
  has bf16 units, under bf16 autocast (how `dgmood train` runs it there);
- the default detector's time per image, statistic by statistic, on the first ``--n`` images of ``--data``
  (MNIST's test images by default);
- wall time of ``dgmood predict`` on those images in a fresh process (start, model load, scoring, CSV), for the
  default detector and for the raw-pixel 5-NN, their ratio, and each process's peak resident memory;
- scikit-learn's brute-force 5-NN on the same images (fit + search on decoded arrays) and the default predict's
  ratio to it (issue 26's reference);
- peak resident memory of ``dgmood predict`` with the default detector on ``--memory-n`` images (100,000).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench import train_throughput  # noqa: E402

from dgmood.app.runs import Run  # noqa: E402
from dgmood.models.train import native_bf16  # noqa: E402


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """fp32 GFLOP/s of an n × n matmul (2n³ FLOPs each) after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def network_gflops(model, batch: int = 500, reps: int = 5, runner=None) -> tuple[float, float]:
    """(GFLOP/s, GFLOP per image) of the score network's forward pass on a batch of random images; FLOPs counted
    on the module, time taken on ``runner`` (default the module; e.g. its ONNX Runtime session)."""
    from torch.utils.flop_counter import FlopCounterMode

    runner = runner or model
    x, sigma = torch.rand(batch, *model.config.image_shape), torch.full((batch,), 0.1)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.scaled_score(x, sigma)
        flops = counter.get_total_flops()
        runner.scaled_score(x, sigma)
        start = time.perf_counter()
        for _ in range(reps):
            runner.scaled_score(x, sigma)
        seconds = (time.perf_counter() - start) / reps
    return flops / seconds / 1e9, flops / batch / 1e9


def statistic_ms(detector, images: np.ndarray) -> dict[str, float]:
    """Milliseconds per image of each statistic of ``detector`` on ``images`` (uncached)."""
    out = {}
    for stat in detector.statistics:
        start = time.perf_counter()
        stat.compute(detector.network_for(stat), images, detector.device, False)
        out[stat.name] = 1e3 * (time.perf_counter() - start) / len(images)
    return out


# Runs dgmood's CLI and prints the process's own peak RSS (VmHWM) at exit. The child's ru_maxrss would not do: a
# child forked from this process counts this process's resident pages at the fork, and exec keeps that maximum.
_PEAK_WRAPPER = """import atexit, runpy, sys
def peak():
    try:
        kb = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]
    except (OSError, IndexError):
        return
    print(f'PEAK_KB {kb}', file=sys.stderr)
atexit.register(peak)
sys.argv = ['dgmood', *sys.argv[1:]]
runpy.run_module('dgmood', run_name='__main__')
"""


def timed_predict(run_dir: Path, spec: str | list[str], method: str, out: Path, threads: int) -> dict:
    """Wall seconds and peak RSS (MB, the process's own high-water mark where /proc has it, else ru_maxrss) of
    ``dgmood predict`` on one spec or several in a fresh process."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, "predict", "--run", str(run_dir), *specs, "--out", str(out),
           "--method", method, "--threads", str(threads), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    lines = proc.stdout.read().strip().splitlines()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("dgmood predict failed:\n" + "\n".join(lines))
    peaks = [int(line.split()[1]) for line in lines if line.startswith("PEAK_KB ")]
    summary = [line for line in lines if not line.startswith("PEAK_KB ")]
    return {"seconds": seconds, "peak_mb": (peaks[-1] if peaks else usage.ru_maxrss) / 1024, "summary": summary[-1]}


def alternating_predicts(run_dir: Path, spec: str, methods, out: Path, threads: int, repeats: int) -> dict:
    """:func:`timed_predict` of each method ``repeats`` times, the methods alternating (so a slow spell of the
    machine hits both): per method the median seconds, every run's seconds and the largest peak RSS."""
    runs = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            runs[m].append(timed_predict(run_dir, spec, m, out / f"{m}.csv", threads))
    return {m: {"seconds": float(np.median([r["seconds"] for r in rs])), "runs": [r["seconds"] for r in rs],
                "peak_mb": max(r["peak_mb"] for r in rs), "summary": rs[-1]["summary"]} for m, rs in runs.items()}


def sklearn_knn_seconds(run: Run, spec: str, k: int = 5) -> float:
    """Seconds of scikit-learn's brute-force ``NearestNeighbors`` finding the k nearest training images (raw pixels,
    float32) of the images of ``spec``: fit + kneighbors on arrays already decoded (the issue's reference for
    ``predict``; decoding and start-up are not counted, so the ratio to it is the stricter one)."""
    from sklearn.neighbors import NearestNeighbors

    bank = run.images(run.config.data).reshape(-1, int(np.prod(run.config.net.image_shape)))
    queries = run.images(spec)
    queries = queries.reshape(len(queries), -1)
    start = time.perf_counter()
    NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank).kneighbors(queries)
    return time.perf_counter() - start


def memory_specs(n: int) -> list[str]:
    """Dataset specs of ``n`` images for the memory check: FashionMNIST train and test, MNIST test, then uniform
    and Gaussian noise for the rest (10,000 each at most; the sets every checkout has)."""
    specs, left = [], n
    for name, size in (("fashion-mnist:train", 60000), ("fashion-mnist:test", 10000), ("mnist:test", 10000),
                       ("uniform", 10000), ("gaussian", 10000)):
        take = min(size, left)
        if take > 0:
            specs.append(f"{name}[:{take}]")
            left -= take
    return specs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--n", type=int, default=10000, help="test images scored")
    parser.add_argument("--data", default="mnist:test", help="the set scored (its first --n images)")
    parser.add_argument("--memory-n", type=int, default=100000,
                        help="images of the peak-memory check of the default detector (see memory_specs; 0 skips it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each timed predict (median reported)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.run, progress=False)
    detector = run.image_detector()  # fitted (and saved) first when missing, so predict below only loads it
    batch = next((s.batch_size for s in detector.statistics if hasattr(s, "batch_size")), 500)
    result = {"threads": args.threads, "n": args.n, "matmul_gflops": matmul_gflops()}
    result["runtime"] = detector.runtime
    result["torch_network_gflops"], _ = network_gflops(run.model, batch)
    runner = next((detector.network_for(s) for s in detector.statistics if s.forward_only), run.model)
    result["network_gflops"], result["network_gflop_per_image"] = network_gflops(run.model, batch, runner=runner)
    result["network_fraction_of_matmul"] = result["network_gflops"] / result["matmul_gflops"]
    result["train_images_per_s"] = train_throughput(run.config.net)
    if native_bf16("cpu"):  # dgmood trains under bf16 autocast here: time that too, side by side
        result["train_bf16_images_per_s"] = train_throughput(run.config.net, amp=True)
    spec = f"{args.data}[:{args.n}]"
    result["statistic_ms"] = statistic_ms(detector, run.images(f"{args.data}[:{min(args.n, 2000)}]"))
    result["predict"] = alternating_predicts(args.run, spec, (run.config.method, "pixel-knn"), args.out, args.threads,
                                             args.repeats)
    result["predict_ratio"] = result["predict"][run.config.method]["seconds"] / result["predict"]["pixel-knn"]["seconds"]
    result["sklearn_knn_seconds"] = sklearn_knn_seconds(run, spec)
    result["predict_ratio_sklearn"] = result["predict"][run.config.method]["seconds"] / result["sklearn_knn_seconds"]
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))  # kept if the memory check below fails
    if args.memory_n:
        many = memory_specs(args.memory_n)
        result["memory"] = dict(timed_predict(args.run, many, run.config.method, args.out / "many.csv", args.threads),
                                n=args.memory_n, specs=many)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Speed ({args.threads} threads, {args.run})", "",
        f"- fp32 matmul 2048²: {result['matmul_gflops']:.1f} GFLOP/s; score network forward (batch {batch}) as the "
        f"default detector runs it ({result['runtime']}): {result['network_gflops']:.1f} GFLOP/s = "
        f"{100 * result['network_fraction_of_matmul']:.0f} % of it ({1e3 * result['network_gflop_per_image']:.1f} "
        f"MFLOP per image and σ); the PyTorch module: {result['torch_network_gflops']:.1f} GFLOP/s",
        f"- training: {result['train_images_per_s']:.0f} images/s fp32 (batch 128)"
        + (f", {result['train_bf16_images_per_s']:.0f} images/s under bf16 autocast (dgmood's default on this CPU)"
           if "train_bf16_images_per_s" in result else ""),
        "- statistics of the default detector, ms per image: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["statistic_ms"].items())
        + f" (total {sum(result['statistic_ms'].values()):.2f})",
        *(f"- `dgmood predict --method {m}` on {spec}: {p['seconds']:.1f} s wall (median of "
          f"{', '.join(f'{t:.1f}' for t in p['runs'])}), peak {p['peak_mb']:.0f} MB" for m, p in result["predict"].items()),
        f"- ratio default / pixel-knn (medians): {result['predict_ratio']:.2f}",
        f"- scikit-learn brute-force 5-NN on the same images, decoded already (fit + kneighbors): "
        f"{result['sklearn_knn_seconds']:.1f} s; ratio default predict / it: {result['predict_ratio_sklearn']:.2f}",
    ]
    if "memory" in result:
        m = result["memory"]
        lines.append(f"- `dgmood predict` (default) on {m['n']:,} images ({' + '.join(m['specs'])}): "
                     f"{m['seconds']:.1f} s wall, peak {m['peak_mb']:.0f} MB")
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
