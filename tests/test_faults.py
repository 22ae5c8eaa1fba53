"""Fault tolerance (issue "faults"): real subprocesses are killed with SIGKILL at random moments.

1. Training killed 20 times in a row, then resumed, ends bitwise equal to an uninterrupted run; after
   every kill the checkpoint on disk is complete, loadable and never older than one seen before.
2. Atomic writes (``atomic_write``, ``FeatureCache.save``, ``write_metrics``): a writer killed at any
   moment leaves the target absent, the old complete version or a new complete version.
3. Corrupt, swapped or mismatched checkpoints and feature caches give a clear error or a recomputation,
   never a wrong answer.

Kill moments come from seeded RNGs, so a failing sequence of moments can be replayed; the outcome of a
kill still depends on the machine's speed, so each test reports what its kills hit in its messages.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dgmood.models.checkpoint import META, STATE, WEIGHTS, CheckpointError, load_model
from dgmood.app.cli import main
from dgmood.statistics.score_norms import FeatureCache, score_norms
from dgmood.utils.files import file_sha256
from dgmood.evaluation.metrics import METRIC_NAMES

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

# One uninterrupted run: ~2.5 s of startup (torch import, Adam's lazy torch._dynamo import) plus
# ~2 s of training at ~80 steps/s on one thread (12×12 images, channels 8,16).
N_STEPS, EVERY, N_IMAGES, BATCH = 160, 4, 256, 16
KILLS = 20
SEED = 20260101

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CKPT_FILES = (WEIGHTS, STATE, META)

# Signature of a torn checkpoint (weights/state not matching checkpoint.json). save_checkpoint stages
# the weight files and commits them with checkpoint.json, so a kill must never leave one.
TORN = "does not match its checkpoint.json"


def _train_cmd(run: Path, data: Path, steps: int = N_STEPS, python: list[str] | None = None) -> list[str]:
    python = [sys.executable, "-m", "dgmood"] if python is None else python
    return [*python, "train", "--run", str(run), "--data", str(data),
            "--steps", str(steps), "--checkpoint-every", str(EVERY), "--channels", "8,16",
            "--batch-size", str(BATCH), "--threads", "1", "--quiet"]


def _tensors(folder: Path) -> tuple[dict, dict]:
    return load_file(str(folder / WEIGHTS)), load_file(str(folder / STATE))


def _assert_tensors_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{what}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"


def _stray(folder: Path) -> list[str]:
    """Files in a checkpoint folder other than the three checkpoint files and hidden temporaries: ours
    (``.weights.safetensors.*``, ...) and safetensors' own (``save_file`` writes ``.tmpXXXXXX``, then renames)."""
    def temporary(f: str) -> bool:
        core = f.lstrip(".")
        return f.startswith(".") and (core.startswith("tmp") or any(core.startswith(f"{n}.") for n in CKPT_FILES))

    return [f for f in os.listdir(folder) if f not in CKPT_FILES and not temporary(f)]


def _temporaries(folder: Path) -> set[str]:
    return {f for f in os.listdir(folder) if f.startswith(".")} if folder.is_dir() else set()


def _watch(proc: subprocess.Popen, seconds: float, meta_path: Path, past_step: int | None = None
           ) -> tuple[bool, int]:
    """Wait up to ``seconds`` for ``proc``, reading the step of every checkpoint.json that appears.

    The wait counts from now, or with ``past_step`` from the moment a checkpoint past that step appears.
    Returns (whether the process ended by itself, the highest checkpoint step seen on disk).
    """
    end = time.monotonic() + (seconds if past_step is None else 300)
    seen, last = 0, None
    while True:
        try:
            st = os.stat(meta_path)
            if (st.st_ino, st.st_mtime_ns, st.st_size) != last:
                last = (st.st_ino, st.st_mtime_ns, st.st_size)
                seen = max(seen, json.loads(meta_path.read_text())["step"])  # a partial JSON fails here
                if past_step is not None and seen > past_step:
                    end, past_step = time.monotonic() + seconds, None
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return True, seen
        left = end - time.monotonic()
        if left <= 0:
            return False, seen
        time.sleep(min(0.002, left))


def _readline(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """The child's first stdout line, or '' when it prints none within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def images_npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (N_IMAGES, 12, 12), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images_npy) -> dict:
    """Two uninterrupted runs in two processes, side by side (to check determinism), and their timing."""
    root = tmp_path_factory.mktemp("reference")
    runs = [root / "a", root / "b"]
    logs = [open(root / f"{run.name}.log", "w") for run in runs]
    start, first, total = time.monotonic(), [None, None], [None, None]
    procs = [subprocess.Popen(_train_cmd(run, images_npy), env=ENV, stdout=subprocess.DEVNULL, stderr=log)
             for run, log in zip(runs, logs)]
    try:
        while None in total:
            for i, (run, proc) in enumerate(zip(runs, procs)):
                if first[i] is None and (run / "checkpoint" / META).exists():
                    first[i] = time.monotonic() - start
                if total[i] is None and proc.poll() is not None:
                    total[i] = time.monotonic() - start
            time.sleep(0.005)
    finally:
        for proc, log in zip(procs, logs):
            _kill(proc)
            log.close()
    for run, proc in zip(runs, procs):
        assert proc.returncode == 0, (root / f"{run.name}.log").read_text()
    return {"checkpoints": [run / "checkpoint" for run in runs], "first_checkpoint_s": min(first),
            "total_s": min(total)}


# --- 1. kill and resume ------------------------------------------------------------------------


def test_training_is_deterministic_across_processes(reference):
    """The premise of the kill test: the same command gives bitwise identical weights, Adam and RNG state."""
    (wa, sa), (wb, sb) = (_tensors(c) for c in reference["checkpoints"])
    _assert_tensors_equal(wa, wb, "EMA weights of two uninterrupted runs")
    _assert_tensors_equal(sa, sb, "training state of two uninterrupted runs")
    meta = json.loads((reference["checkpoints"][0] / META).read_text())
    assert [e["step"] for e in meta["log"]] == list(range(EVERY, N_STEPS + 1, EVERY))


@pytest.mark.slow  # 20+ real `dgmood train` processes, each ~2.5 s of startup before it can be killed: about a minute
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path, images_npy, reference):
    """Kill `dgmood train` 20 times in a row at random moments (startup, training, checkpoint writes),
    rerunning the same command each time; check the checkpoint after every kill, and the end result."""
    rng = np.random.default_rng(SEED)
    # Kill moments: 30 % at a random time in the startup (imports, config write, data and checkpoint
    # loading: up to this machine's time to a first checkpoint), the rest a random time after the
    # process wrote its first new checkpoint (training steps and checkpoint writes). Counting from that
    # event, not from the start, keeps the mix independent of how loaded the machine is, and the short
    # random wait (a few checkpoint intervals, less near the end) keeps the run from finishing early.
    t_first = reference["first_checkpoint_s"]
    steps_per_s = (N_STEPS - EVERY) / (reference["total_s"] - t_first)
    run, log = tmp_path / "run", tmp_path / "train.log"
    ckpt, meta_path = run / "checkpoint", run / "checkpoint" / META
    cmd = _train_cmd(run, images_npy)
    saved, torn, stats, history = 0, [], Counter(), []
    for kill in range(2 * KILLS):  # a run that completes before its kill moment starts over
        if stats["killed"] == KILLS:
            break
        in_startup = rng.random() < 0.3
        if in_startup:
            delay = float(rng.uniform(0.05, 1.0) * t_first)
        else:
            delay = float(min(rng.uniform(0, 0.2), 0.3 * (N_STEPS - saved - EVERY) / steps_per_s))
        before = _temporaries(ckpt)
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
            try:
                finished, seen = _watch(proc, delay, meta_path, None if in_startup else saved)
            finally:
                _kill(proc)
        if finished:  # completed before its kill moment: nothing left to interrupt
            assert proc.returncode == 0, log.read_text()
            stats["finished early"] += 1
            shutil.rmtree(run)
            saved = 0
            continue
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        stats["killed"] += 1
        where = f"kill {kill} {'from start' if in_startup else f'after a checkpoint past {saved}'} +{delay:.2f} s"

        # the run folder holds nothing half-written
        if (run / "config.json").exists():
            json.loads((run / "config.json").read_text())
        if run.is_dir():
            assert not [f for f in os.listdir(run) if f not in ("config.json", "checkpoint")
                        and not f.startswith(".config.json.")], (where, os.listdir(run))
        if not ckpt.is_dir():
            assert saved == 0, f"{where}: the checkpoint folder vanished"
            stats["before any checkpoint"] += 1
            continue
        assert not _stray(ckpt), (where, os.listdir(ckpt))
        if _temporaries(ckpt) - before:
            stats["mid-write (left a temporary)"] += 1
        if not meta_path.exists():  # no checkpoint committed yet (the first save was interrupted)
            assert saved == 0 and seen == 0, f"{where}: checkpoint.json vanished"
            stats["before any checkpoint"] += 1
            continue

        try:
            _, meta = load_model(ckpt)
        except CheckpointError as err:
            if TORN not in str(err):
                raise
            torn.append(f"{where}: {err}")
            shutil.rmtree(ckpt)  # what the error tells a user to do; training restarts from step 0
            saved = 0
            continue
        # what a resume reads too: the training state matches checkpoint.json
        assert file_sha256(ckpt / STATE) == meta["sha256"][STATE], f"{where}: state.safetensors {TORN}"
        step = meta["step"]
        assert step % EVERY == 0 or step == N_STEPS, (where, step)
        # never older than a checkpoint seen committed: at most the interval in progress is lost
        assert step >= max(saved, seen), f"{where}: checkpoint at step {step}, but step {max(saved, seen)} was saved"
        assert [e["step"] for e in meta["log"]] == list(range(EVERY, step + 1, EVERY)), where
        stats["progressed" if step > saved else "no new checkpoint"] += 1
        saved = step
        history.append(step)

    summary = f"{dict(stats)}; checkpoint steps after each kill: {history}; torn: {len(torn)}"
    print(summary)
    assert stats["killed"] == KILLS, f"the run finished before {KILLS} kills: {summary}"

    # the same command finishes the run ...
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # ... bitwise equal to the uninterrupted run: EMA, raw weights, Adam moments, RNG; same loss log
    ref = reference["checkpoints"][0]
    (w, s), (w_ref, s_ref) = _tensors(ckpt), _tensors(ref)
    _assert_tensors_equal(w, w_ref, f"EMA weights after the kills ({summary})")
    _assert_tensors_equal(s, s_ref, f"training state after the kills ({summary})")
    log_done, log_ref = (json.loads((c / META).read_text())["log"] for c in (ckpt, ref))
    assert [(e["step"], e["loss"]) for e in log_done] == [(e["step"], e["loss"]) for e in log_ref]
    assert not torn, f"a kill left {len(torn)} unloadable checkpoint(s): {torn[0]}"


# A child that runs the CLI with checkpoint.json's write intercepted at the second checkpoint (step
# 2·EVERY): it prints a marker and blocks just before (or just after) the write, where the parent kills it.
BLOCKING_TRAIN = r"""
import sys, time
import dgmood.models.checkpoint as ckpt
when = sys.argv.pop(1)
real, calls = ckpt.write_json, []

def write_json(path, obj):
    calls.append(1)
    if len(calls) == 2 and when == "before":
        print("blocked", flush=True); time.sleep(60)
    real(path, obj)
    if len(calls) == 2 and when == "after":
        print("blocked", flush=True); time.sleep(60)

ckpt.write_json = write_json
from dgmood.app.cli import main
main()
"""


@pytest.mark.parametrize("when", [
    "before",
    "after",
])
def test_kill_around_checkpoint_json_keeps_a_loadable_checkpoint(tmp_path, images_npy, when):
    """Kill `dgmood train` at the second checkpoint, with both weight files renamed into place and
    checkpoint.json about to be (or just) written: the folder must still load and resume."""
    script = tmp_path / "blocking_train.py"
    script.write_text(BLOCKING_TRAIN)
    run = tmp_path / "run"
    steps = 3 * EVERY
    proc = subprocess.Popen(_train_cmd(run, images_npy, steps, [sys.executable, str(script), when]), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _readline(proc)
    finally:
        _kill(proc)
    assert line == "blocked\n", proc.stderr.read()
    assert not _stray(run / "checkpoint")
    _, meta = load_model(run / "checkpoint")
    assert meta["step"] in (EVERY, 2 * EVERY)
    # resuming with the plain command completes the run
    result = CliRunner().invoke(main, _train_cmd(run, images_npy, steps, []))
    assert result.exit_code == 0, result.output
    assert load_model(run / "checkpoint")[1]["step"] == steps


# --- 2. atomic writes --------------------------------------------------------------------------

SIZE, CHUNK, ROWS, L, N_OOD = 16 << 20, 256 << 10, 400_000, 10, 4000

# A child that writes one target over and over, version after version, until it is killed. Writes go
# to a simulated slow disk (in pieces, a few ms apart), so that most kills land inside a write: building
# a feature matrix or a metrics table would otherwise take longer than writing it.
WRITER = r"""
import pathlib, sys, time
import numpy as np
mode, target, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
SIZE, CHUNK, ROWS, L, N_OOD = %d, %d, %d, %d, %d

class SlowFile:
    def __init__(self, f):
        self._f = f
    def write(self, data):
        view = memoryview(data).cast("B")
        for i in range(0, len(view), 1 << 20):
            self._f.write(view[i : i + (1 << 20)])
            self._f.flush()
            time.sleep(0.002)
        return len(view)
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()

def slow_write_text(self, text, encoding=None, errors=None, newline=None):
    with open(self, "w", encoding=encoding, errors=errors, newline=newline) as f:
        for i in range(0, len(text), 1 << 14):
            f.write(text[i : i + (1 << 14)])
            f.flush()
            time.sleep(0.002)

def write_bytes(path, v):
    with open(path, "wb") as f:
        f.write(b"%%d\n" %% v)
        block = bytes([v %% 251]) * CHUNK
        for _ in range(SIZE // CHUNK):
            f.write(block)
            time.sleep(0.0005)

if mode == "naive":  # the control: no temporary file, no rename
    write = lambda v: write_bytes(target, v)
elif mode == "bytes":
    from dgmood.utils.files import atomic_write
    write = lambda v: atomic_write(target, lambda p: write_bytes(p, v))
elif mode == "features":
    import dgmood.statistics.score_norms
    from dgmood.statistics.score_norms import FeatureCache
    dgmood.statistics.score_norms.open = lambda *args, **kwargs: SlowFile(open(*args, **kwargs))
    cache = FeatureCache(target, "f" * 64)
    sigmas = np.geomspace(1, 0.01, L)
    write = lambda v: cache.save("set", sigmas, np.full((ROWS, L), v, np.float32), version=v)
elif mode == "metrics":
    from dgmood.evaluation.metrics import METRIC_NAMES
    from dgmood.evaluation.report import write_metrics
    pathlib.Path.write_text = slow_write_text
    write = lambda v: write_metrics(target, {"knn": {f"ood{j}": dict.fromkeys(METRIC_NAMES, v / 1e6)
                                                     for j in range(N_OOD)}})
print("ready", flush=True)
while True:
    write(version)
    version += 1
""" % (SIZE, CHUNK, ROWS, L, N_OOD)


def _bytes_version(path: Path) -> int | None:
    """Version of a complete file written by ``write_bytes``; None when partial."""
    head, _, body = path.read_bytes().partition(b"\n")
    if not head.isdigit():
        return None
    v = int(head)
    return v if body == bytes([v % 251]) * SIZE else None


def _features_version(path: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file warns: make it fail here
        loaded = FeatureCache(path, "f" * 64).load("set", np.geomspace(1, 0.01, L))
    assert loaded is not None
    v = loaded.meta["version"]
    assert loaded.values.shape == (ROWS, L) and np.all(loaded.values == v)
    return v


def _metrics_versions(path: Path) -> tuple[int, int]:
    """Versions of metrics.json and metrics.csv (0: no CSV yet; the JSON is written first)."""
    nested = json.loads((path / "metrics.json").read_text())
    assert list(nested) == ["knn"] and len(nested["knn"]) == N_OOD
    values = {v for per_ood in nested["knn"].values() for v in per_ood.values()}
    assert len(values) == 1 and all(len(m) == len(METRIC_NAMES) for m in nested["knn"].values())
    if not (path / "metrics.csv").exists():
        return round(values.pop() * 1e6), 0
    lines = (path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(["detector", "ood", *METRIC_NAMES]) and len(lines) == N_OOD + 1
    csv_values = {cell for line in lines[1:] for cell in line.split(",")[2:]}
    assert len(csv_values) == 1 and all(line.count(",") == len(METRIC_NAMES) + 1 for line in lines[1:])
    return round(values.pop() * 1e6), round(float(csv_values.pop()) * 1e6)


def _written(target: Path, mode: str) -> bool:
    if mode == "features":
        return any(target.glob("*.npz"))
    return (target / "metrics.json").exists() if mode == "metrics" else target.exists()


def _kill_writer(tmp_path: Path, mode: str, kills: int, check, seed: int, mid_write: bool = False) -> Counter:
    """Start the writer ``kills`` times, SIGKILL it after a random delay, check the target each time.

    ``check(target)`` returns the complete version(s) on disk; they must never go backwards. With ``mid_write``
    it goes on (up to 5 × ``kills`` times) until at least one kill has landed mid-write: on a busy machine
    the random delays alone may all miss the write.
    """
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    target = tmp_path / mode / ("data.bin" if mode in ("bytes", "naive") else "")
    target.parent.mkdir(exist_ok=True)
    rng, stats, last = np.random.default_rng(seed), Counter(), None
    for kill in range(5 * kills if mid_write else kills):
        if kill >= kills and stats["kills mid-write"]:
            break
        start = 1 if last is None else max(np.atleast_1d(last)) + 1
        proc = subprocess.Popen([sys.executable, str(script), mode, str(target), str(start)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = _readline(proc)
            time.sleep(float(rng.uniform(0.0, 0.3)))
        finally:
            _kill(proc)
        assert ready == "ready\n", proc.stderr.read()
        # counted right after each kill: the next writer's save removes a dead writer's temporaries
        stats["kills mid-write"] += bool(_temporaries(target if target.is_dir() else target.parent))
        if not _written(target, mode):
            assert last is None, f"{mode}, kill {kill}: the target vanished"
            stats["absent"] += 1
            continue
        version = check(target)
        if version is None:
            stats["partial"] += 1
            continue
        assert last is None or np.all(np.asarray(version) >= np.asarray(last)), (mode, kill, version, last)
        stats["new" if last is None or np.any(np.asarray(version) > np.asarray(last)) else "old"] += 1
        last = version
    print(mode, dict(stats))
    return stats


def test_killed_naive_writer_leaves_partial_files(tmp_path):
    """Control: the harness of the atomic-write tests does see half-written files when writes are not atomic."""
    stats = _kill_writer(tmp_path, "naive", 12, _bytes_version, seed=SEED)
    assert stats["partial"] >= 1, stats


def test_killed_atomic_write_leaves_old_or_new_complete_file(tmp_path):
    stats = _kill_writer(tmp_path, "bytes", 12, _bytes_version, seed=SEED + 1, mid_write=True)
    assert stats["partial"] == 0, stats
    assert stats["kills mid-write"] >= 1, f"no kill landed mid-write: {stats}"


def test_killed_feature_cache_save_leaves_a_loadable_cache(tmp_path):
    stats = _kill_writer(tmp_path, "features", 5, _features_version, seed=SEED + 2, mid_write=True)
    assert stats["partial"] == 0, stats
    assert stats["kills mid-write"] >= 1, f"no kill landed mid-write: {stats}"


def test_killed_write_metrics_leaves_complete_metrics_files(tmp_path):
    stats = _kill_writer(tmp_path, "metrics", 8, _metrics_versions, seed=SEED + 3, mid_write=True)
    assert stats["partial"] == 0, stats
    assert stats["kills mid-write"] >= 1, f"no kill landed mid-write: {stats}"


# --- 3. corrupt or mismatched checkpoints and caches ---------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, images_npy) -> tuple[Path, Path]:
    """Two tiny trained runs on the same data with different seeds (so different weights)."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", 0), ("b", 1)):
        result = _invoke(*_train_cmd(root / name, images_npy, steps=2 * EVERY, python=[]), "--seed", seed)
        assert result.exit_code == 0, result.output
    return root / "a", root / "b"


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _corrupt(run: Path, other: Path, how: str) -> None:
    ckpt = run / "checkpoint"
    if how == "weights swapped":
        shutil.copy(other / "checkpoint" / WEIGHTS, ckpt / WEIGHTS)
    elif how == "state swapped":
        shutil.copy(other / "checkpoint" / STATE, ckpt / STATE)
    elif how == "checkpoint.json swapped":
        shutil.copy(other / "checkpoint" / META, ckpt / META)
    elif how == "weights truncated":
        data = (ckpt / WEIGHTS).read_bytes()
        (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "checkpoint.json truncated":
        text = (ckpt / META).read_text()
        (ckpt / META).write_text(text[: len(text) // 2])


@pytest.mark.parametrize("how, names", [
    ("weights swapped", WEIGHTS),
    ("checkpoint.json swapped", WEIGHTS),
    ("weights truncated", WEIGHTS),
    ("checkpoint.json truncated", "is corrupt"),
])
def test_evaluate_refuses_a_corrupt_or_swapped_checkpoint(tmp_path, two_runs, images_npy, how, names):
    a, b = two_runs
    run = tmp_path / "a"
    shutil.copytree(a, run)
    _corrupt(run, b, how)
    message = _one_line_error(_invoke("evaluate", "--run", run, "--threads", 1, "--quiet",
                                      "--in", f"{images_npy}[:64]", "--ood", "uniform[:32]"))
    assert names in message and "retrain" in message, message
    assert not (run / "features").exists() or not list((run / "features").glob("*.npz")), "features were computed"
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("how, names", [("state swapped", STATE), ("weights swapped", WEIGHTS)])
def test_resume_refuses_a_swapped_checkpoint_file(tmp_path, two_runs, images_npy, how, names):
    a, b = two_runs
    run = tmp_path / "a"
    shutil.copytree(a, run)
    _corrupt(run, b, how)
    message = _one_line_error(_invoke(*_train_cmd(run, images_npy, steps=3 * EVERY, python=[])))
    assert names in message and "does not match" in message, message
    assert json.loads((run / "checkpoint" / META).read_text())["step"] == 2 * EVERY  # nothing overwritten


class _Scaled:
    """A stand-in score model with σ·s(x, σ) = c·σ·x, so the score norms are c·σ·‖x‖."""

    def __init__(self, c: float):
        self.c, self.calls = c, 0

    def scaled_score(self, x, sigma):
        self.calls += 1
        return self.c * sigma.view(-1, 1, 1, 1) * x


def test_feature_cache_of_another_model_is_recomputed(tmp_path):
    sigmas = np.geomspace(1, 0.01, 3)
    images = np.random.default_rng(0).random((20, 1, 12, 12), dtype=np.float32)
    cache_a, cache_b = FeatureCache(tmp_path, "a" * 64), FeatureCache(tmp_path, "b" * 64)
    fa = cache_a.get("set", sigmas, lambda: images, _Scaled(1.0), progress=False)
    assert cache_b.load("set", sigmas) is None
    # model A's cache file where model B's belongs (copied run folder, renamed file): not reused
    shutil.copy(cache_a.path("set", sigmas), cache_b.path("set", sigmas))
    assert cache_b.load("set", sigmas) is None
    model_b = _Scaled(2.0)
    fb = cache_b.get("set", sigmas, lambda: images, model_b, progress=False)
    assert model_b.calls > 0 and fb.meta["model_sha256"] == "b" * 64
    np.testing.assert_allclose(fb.values, score_norms(model_b, images, sigmas), rtol=1e-6)
    np.testing.assert_allclose(fb.values, 2 * fa.values, rtol=1e-6)
    reloaded = cache_b.load("set", sigmas)  # B's recomputed cache replaced the foreign file
    assert reloaded.meta["model_sha256"] == "b" * 64 and np.array_equal(reloaded.values, fb.values)
    assert np.array_equal(cache_a.load("set", sigmas).values, fa.values)  # A's own cache untouched


@pytest.mark.parametrize("foreign", ["another dataset", "another sigma grid"])
def test_feature_cache_of_another_dataset_or_grid_is_not_reused(tmp_path, foreign):
    sigmas = np.geomspace(1, 0.01, 3)
    images = np.random.default_rng(0).random((20, 1, 12, 12), dtype=np.float32)
    cache = FeatureCache(tmp_path, "a" * 64)
    if foreign == "another dataset":
        other = cache.get("other", sigmas, lambda: 1 - images, _Scaled(1.0), progress=False)
        src = cache.path("other", sigmas)
    else:
        other = cache.get("set", sigmas[:2], lambda: images, _Scaled(1.0), progress=False)
        src = cache.path("set", sigmas[:2])
    shutil.copy(src, cache.path("set", sigmas))
    assert cache.load("set", sigmas) is None
    got = cache.get("set", sigmas, lambda: images, _Scaled(1.0), progress=False)
    assert got.meta["dataset"] == "set" and got.values.shape == (20, 3)
    np.testing.assert_allclose(got.values, score_norms(_Scaled(1.0), images, sigmas), rtol=1e-6)
    if foreign == "another dataset":
        assert not np.allclose(got.values, other.values)


def test_corrupt_feature_cache_is_recomputed_with_a_warning(tmp_path):
    sigmas = np.geomspace(1, 0.01, 3)
    cache = FeatureCache(tmp_path, "a" * 64)
    cache.save("set", sigmas, np.ones((20, 3), np.float32))
    path = cache.path("set", sigmas)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="is damaged .*recomputing it"):
        assert cache.load("set", sigmas) is None


def test_run_with_another_checkpoint_does_not_reuse_its_features(tmp_path, two_runs, images_npy):
    """A run folder whose checkpoint is replaced (consistently) by another model's recomputes features."""
    from dgmood.app.runs import Run

    a, b = two_runs
    run_dir = tmp_path / "a"
    shutil.copytree(a, run_dir)
    spec = f"{images_npy}[:32]"
    before = Run(run_dir, progress=False).features(spec)
    shutil.rmtree(run_dir / "checkpoint")
    shutil.copytree(b / "checkpoint", run_dir / "checkpoint")
    run = Run(run_dir, progress=False)
    after = run.features(spec)
    assert after.meta["model_sha256"] == file_sha256(b / "checkpoint" / WEIGHTS) != before.meta["model_sha256"]
    model_b, _ = load_model(b / "checkpoint")
    expected = score_norms(model_b, run.images(spec), run.config.features.sigmas())
    np.testing.assert_allclose(after.values, expected, rtol=1e-5)
    assert not np.allclose(after.values, before.values)
