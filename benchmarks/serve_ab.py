"""Two `dgmood serve` builds on the same detector, load-tested in turn in one run (loopback only, bounded).

Usage::

    git archive 70f4c4d src | tar -x -C /tmp/old-serve          # the source tree of the earlier server
    python benchmarks/serve_ab.py --run runs/demo --method msma-knn --image x.png \\
        --build old=/tmp/old-serve/src --build new=src --concurrency 1,32 --requests 200,1000 --rounds 2

Each round starts each build's server (``python -m dgmood serve --port 0 --threads T --quiet`` with that
build first on PYTHONPATH), runs ``benchmarks/load_test.py`` at each concurrency, and stops it, so the builds
alternate under the same machine load. Prints one line per (round, build, concurrency) and, per build and
concurrency, the median over rounds (requests/s, p50 and p99 each; failures summed) as a Markdown table.
Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def start(src: Path, run: Path, method: str | None, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server of the build at ``src``, on a free loopback port."""
    env = dict(os.environ, PYTHONPATH=str(src.resolve()), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dgmood", "serve", "--run", str(run), "--port", "0", "--threads", str(threads),
           "--quiet", *(["--method", method] if method else []), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "http://127.0.0.1:" not in line:
        stop(proc)
        raise SystemExit(f"the server at {src} did not start: {line!r}")
    return proc, "http://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split()[0]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def load(url: str, image: Path, n: int, concurrency: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "load_test.py"), "--url", url, "--image", str(image),
                          "--requests", str(n), "--concurrency", str(concurrency), "--timeout", "30",
                          "--deadline", "240", "--warmup", "5", "--json"], capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="Fitted run or detector folder.")
    parser.add_argument("--method", default=None, help="Method to serve (default: the run's).")
    parser.add_argument("--image", type=Path, required=True, help="Image to POST (.png, .jpg or .npy).")
    parser.add_argument("--build", action="append", required=True, help="NAME=SRC: a source tree to serve from.")
    parser.add_argument("--concurrency", default="1,32", help="Comma-separated client threads (default 1,32).")
    parser.add_argument("--requests", default="200,1000", help="Requests at each concurrency (default 200,1000).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds over all builds (default 2).")
    parser.add_argument("--threads", type=int, default=1, help="Server torch threads (default 1).")
    args = parser.parse_args(argv)
    builds = dict(b.split("=", 1) for b in args.build)
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(counts) != len(levels):
        parser.error("give one --requests count per --concurrency level")

    runs: dict[tuple[str, int], list[dict]] = {}
    failed = 0
    for r in range(args.rounds):
        for name, src in builds.items():
            proc, url = start(Path(src), args.run, args.method, args.threads, [])
            try:
                for c, n in zip(levels, counts):
                    res = load(url, args.image, n, c)
                    lat, failed = res["latency_ms"], failed + res["failed"]
                    print(f"round {r + 1} {name:>6} c={c:<3} {res['ok']}/{n} ok {res['requests_per_s']:7.1f} req/s "
                          f"p50 {lat['p50']:6.1f} ms p99 {lat['p99']:6.1f} ms"
                          + (f"; outcomes {res['outcomes']}" if res["failed"] else ""), flush=True)
                    runs.setdefault((name, c), []).append(res)
            finally:
                stop(proc)
    print(f"\nmedian of {args.rounds} rounds")
    print("| server | concurrency | requests | failed | requests/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, c), results in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = lambda get: statistics.median(get(r) for r in results)  # noqa: E731
        print(f"| {name} | {c} | {sum(r['requests'] for r in results)} | {sum(r['failed'] for r in results)} | "
              f"{med(lambda r: r['requests_per_s']):.1f} | {med(lambda r: r['latency_ms']['p50']):.1f} | "
              f"{med(lambda r: r['latency_ms']['p99']):.1f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
