"""Load generator for ``dgmood serve``: POST one image N times from a pool of threads (stdlib only).

Usage::

    dgmood serve --run runs/demo --threads 2 --quiet &        # in another shell
    python benchmarks/load_test.py --url http://127.0.0.1:8765 --requests 200 --concurrency 4 --image img.png

Sends ``--requests`` POSTs of the image (raw body) to URL/score from ``--concurrency`` threads,
each with a per-request timeout, and stops starting new ones at the global ``--deadline``. A
request counts as failed unless it returns 200 with a JSON body holding a numeric ``score``.
Prints requests/s and latency percentiles (and a JSON line with ``--json``); exits 1 if any
request failed or did not run, 2 on bad arguments. Only loopback URLs unless ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".npy": "application/octet-stream"}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def one_request(url: str, body: bytes, content_type: str, timeout: float) -> tuple[bool, float, str]:
    """(ok, seconds, outcome) of one POST; outcome is "200" or the status / error kind."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        err.close()
        return False, time.perf_counter() - start, str(err.code)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return False, time.perf_counter() - start, type(reason).__name__
    seconds = time.perf_counter() - start
    try:
        ok = status == 200 and isinstance(json.loads(payload)["score"], (int, float))
    except (ValueError, KeyError, TypeError):
        ok = False
    return ok, seconds, str(status) if ok else f"{status} bad body"


def run(url: str, body: bytes, content_type: str, n: int, concurrency: int, timeout: float, deadline: float) -> dict:
    """Send ``n`` requests with ``concurrency`` threads; none starts after ``deadline`` seconds."""
    latencies, outcomes, lock = [], Counter(), threading.Lock()
    stop_at = time.monotonic() + deadline

    def task():
        if time.monotonic() > stop_at:
            with lock:
                outcomes["not started (deadline)"] += 1
            return
        ok, seconds, outcome = one_request(url, body, content_type, timeout)
        with lock:
            outcomes[outcome] += 1
            if ok:
                latencies.append(seconds)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending = {pool.submit(task) for _ in range(n)}
        while pending:  # bounded: each task ends within `timeout`, none starts after `deadline`
            _, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
    wall = time.perf_counter() - start
    ok = len(latencies)
    return {
        "url": url, "requests": n, "concurrency": concurrency, "ok": ok, "failed": n - ok,
        "outcomes": dict(outcomes), "wall_s": wall, "requests_per_s": ok / wall if wall > 0 else math.nan,
        "latency_ms": {name: 1000 * percentile(latencies, q) for name, q in
                       (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
    }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Server base URL, e.g. http://127.0.0.1:8765 (/score is added).")
    parser.add_argument("--image", required=True, type=Path, help="Image to POST: .png, .jpg or .npy.")
    parser.add_argument("--requests", type=int, default=200, help="Requests to send (default 200).")
    parser.add_argument("--concurrency", type=int, default=4, help="Client threads (default 4).")
    parser.add_argument("--timeout", type=float, default=30.0, help="Per-request timeout in seconds (default 30).")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="No request starts after this many seconds (default 300).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed requests sent first (default 2).")
    parser.add_argument("--json", action="store_true", help="Also print the result as one JSON line.")
    parser.add_argument("--allow-remote", action="store_true", help="Allow a non-loopback URL.")
    args = parser.parse_args(argv)

    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"--url must look like http://127.0.0.1:8765, got {args.url!r}")
    if not (args.allow_remote or _is_loopback(parts.hostname)):
        parser.error(f"{parts.hostname} is not a loopback address; pass --allow-remote to load-test it")
    if not (1 <= args.requests <= 100_000 and 1 <= args.concurrency <= 256):
        parser.error("--requests must be in 1..100000 and --concurrency in 1..256")
    if not (args.timeout > 0 and args.deadline > 0 and args.warmup >= 0):
        parser.error("--timeout and --deadline must be positive, --warmup >= 0")
    try:
        body = args.image.read_bytes()
    except OSError as err:
        parser.error(f"cannot read --image {args.image}: {err.strerror or err}")
    url = args.url.rstrip("/") if parts.path.rstrip("/").endswith("/score") else args.url.rstrip("/") + "/score"
    content_type = CONTENT_TYPES.get(args.image.suffix.lower(), "application/octet-stream")

    for _ in range(args.warmup):
        ok, _, outcome = one_request(url, body, content_type, args.timeout)
        if not ok:
            print(f"warm-up request to {url} failed: {outcome}", file=sys.stderr)
            return 1
    result = run(url, body, content_type, args.requests, args.concurrency, args.timeout, args.deadline)
    lat = result["latency_ms"]
    print(f"{result['ok']}/{result['requests']} ok, {result['failed']} failed in {result['wall_s']:.2f} s "
          f"({args.concurrency} threads): {result['requests_per_s']:.1f} requests/s; latency ms "
          f"p50 {lat['p50']:.1f}, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}, max {lat['max']:.1f}")
    if result["failed"]:
        print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items())))
    if args.json:
        print(json.dumps(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
