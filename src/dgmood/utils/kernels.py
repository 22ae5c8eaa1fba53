"""Kernels chosen by what the machine does: CPU features, a short measured probe, a per-machine cache, overrides.

Three speed choices depend on the CPU (issue 26):

- ``knn``: the candidate search of the k-NN between 8-bit images (:mod:`dgmood.statistics.neighbours`) as int8
  levels with int32 sums (eq. K2) or as fp32 products (eq. K0). int8 is ~3-9x faster where the CPU has integer
  dot-product units (AVX512-VNNI, AVX-VNNI, AMX) and ~16x slower without them (a 2-core EPYC with AVX2 only:
  4,376 against 273 ms for 1024x784 by 784x4096), so it is measured: at first use a probe times both products
  on a 128x784 by 784x512 slice, one thread, min of 3 (about 5 ms here, under 0.3 s without VNNI), and the
  answer is cached per machine.
- ``amp``: the default of ``dgmood train --amp``: bfloat16 autocast where the CPU computes bf16 natively
  (AVX512-BF16 or AMX; a feature rule: the 1.4x speed-up was measured on training, which a matmul probe
  would not predict).
- ``runtime``: where forward-only statistics run a score network on the CPU: ``onnx`` when ONNX Runtime is
  installed (1.8x faster, :mod:`dgmood.models.exported`), else ``torch``.

Each choice is, first found first: an override in ``DGMOOD_KERNELS`` (``"knn=fp32,amp=off,runtime=torch"``,
any subset), the cached probe, a new probe, or the feature rule. The cache is
``$XDG_CACHE_HOME/dgmood/kernels/<fingerprint>.json`` (``~/.cache`` by default), the fingerprint a hash of the
CPU model, its flags and the torch version; a damaged file is measured again and rewritten. ``dgmood info``
prints every choice with where it came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from dgmood.utils.files import user_cache_dir, write_json

__all__ = ["CHOICES", "ENV", "SHOWN_FLAGS", "Choice", "CpuInfo", "amp", "cache_path", "choices", "cpu_info",
           "describe", "knn_kernel", "native_bf16_units", "overrides", "parse_cpuinfo", "probe_knn", "runtime"]

ENV = "DGMOOD_KERNELS"
CHOICES = {"knn": ("int8", "fp32"), "amp": ("on", "off"), "runtime": ("onnx", "torch")}
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
PROBE_SHAPE = (128, 784, 512)
"""(N, D, M) of the probe: N queries by M bank rows of D = 784 values (a 28x28 image), 1/64 of the issue's
1024x784 by 784x4096 product."""
PROBE_REPEATS = 3

_MEMO: dict[str, Choice] = {}


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU is: ``model`` its name, ``flags`` its feature flags (lower case, as /proc/cpuinfo spells
    them), ``capability`` torch's ATen CPU level (``AVX512``, ``AVX2``, ``DEFAULT``, ...), ``machine`` the
    architecture."""

    model: str
    flags: frozenset[str]
    capability: str
    machine: str

    def fingerprint(self, torch_version: str) -> str:
        """16 hex digits naming this machine and torch build in the cache."""
        text = "|".join([self.model, " ".join(sorted(self.flags)), self.capability, self.machine, torch_version])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Choice:
    """One kernel choice: ``name`` (a key of :data:`CHOICES`), ``value`` and ``source`` (``override``,
    ``cached``, ``probe`` or ``feature rule``), ``detail`` the evidence in words."""

    name: str
    value: str
    source: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.value} ({self.source}{': ' + self.detail if self.detail else ''})"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo text (x86 ``model name`` / ``flags``, Arm
    ``Features``); ("", {}) for what it lacks."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.lower().split())
    return model, flags


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's :class:`CpuInfo`: /proc/cpuinfo where it exists, else the platform's processor name."""
    import torch

    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        model, flags = "", frozenset()
    capability = str(torch.backends.cpu.get_cpu_capability())
    return CpuInfo(model or platform.processor() or "unknown", flags, capability, platform.machine())


def overrides(text: str | None = None) -> dict[str, str]:
    """The choices forced by ``text`` (default: ``$DGMOOD_KERNELS``), e.g. ``"knn=fp32,amp=off"`` →
    ``{"knn": "fp32", "amp": "off"}``; an unknown name or value is a ValueError."""
    text = os.environ.get(ENV, "") if text is None else text
    forced = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = (s.strip().lower() for s in item.partition("="))
        if value not in CHOICES.get(name, ()):
            allowed = ", ".join(f"{k}={'|'.join(v)}" for k, v in CHOICES.items())
            raise ValueError(f"{ENV} has {item!r}; expected comma-separated {allowed}")
        forced[name] = value
    return forced


def knn_kernel() -> Choice:
    """The candidate search between 8-bit images: ``int8`` (eq. K2) when it measured faster than ``fp32`` (eq.
    K0) on this machine. Measured once per machine and torch version (see the module docstring)."""
    forced = overrides().get("knn")
    if forced:
        return Choice("knn", forced, "override", f"{ENV}=knn={forced}")
    if "knn" not in _MEMO:
        _MEMO["knn"] = _cached_or_probed_knn()
    return _MEMO["knn"]


def amp() -> Choice:
    """The default of ``dgmood train --amp`` on the CPU: ``on`` where it computes bfloat16 natively."""
    forced = overrides().get("amp")
    if forced:
        return Choice("amp", forced, "override", f"{ENV}=amp={forced}")
    units = native_bf16_units()
    detail = f"{' and '.join(units)} present" if units else "no avx512_bf16 or amx_tile: bf16 would be emulated"
    return Choice("amp", "on" if units else "off", "feature rule", detail)


def runtime() -> Choice:
    """Where forward-only statistics run a score network on the CPU under ``runtime="auto"``."""
    forced = overrides().get("runtime")
    if forced:
        return Choice("runtime", forced, "override", f"{ENV}=runtime={forced}")
    if importlib.util.find_spec("onnxruntime") is not None:
        return Choice("runtime", "onnx", "feature rule", "onnxruntime installed")
    return Choice("runtime", "torch", "feature rule", "onnxruntime not installed")


def choices() -> list[Choice]:
    """Every kernel choice of this machine (the k-NN probe runs now if nothing is cached)."""
    return [knn_kernel(), amp(), runtime()]


def describe() -> list[str]:
    """Lines for ``dgmood info``: the CPU, its flags that matter here, the cache file and every choice with
    where it came from (the k-NN probe runs now if nothing is cached)."""
    info = cpu_info()
    flags = " ".join(f"{flag}{'+' if flag in info.flags else '-'}" for flag in SHOWN_FLAGS)
    lines = [f"cpu: {info.model}, {os.cpu_count()} cores, {info.machine}, torch capability {info.capability}",
             f"flags: {flags}" if info.flags else "flags: not readable (no /proc/cpuinfo)",
             f"kernel cache: {cache_path(info)}"]
    lines += [f"{choice.name}: {choice}" for choice in choices()]
    lines.append(f"threads: {os.cpu_count()} (feature rule: the CPU's cores; --threads sets a command's)")
    lines.append(f"override: {ENV}=" + ",".join(f"{k}={'|'.join(v)}" for k, v in CHOICES.items()))
    return lines


def cache_path(info: CpuInfo | None = None) -> Path:
    """The cache file of this machine and torch version."""
    import torch

    return user_cache_dir("kernels") / f"{(info or cpu_info()).fingerprint(torch.__version__)}.json"


def probe_knn(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = PROBE_REPEATS) -> dict:
    """Time ``torch._int_mm`` of int8 levels against the fp32 product of the same values, (N, D) by (D, M), the
    min of ``repeats`` after a warm-up: ``{"int8_ms", "fp32_ms", "shape", "threads"}``; ``int8_ms`` is None
    where torch lacks ``_int_mm`` or it fails.

    One thread (torch's count is restored after): the kernels' own speed. On 2 cores shared with other work a
    2-thread product this small is mostly waiting for the second core (here 7.5 against 8.0 ms, where one thread
    gave 0.07 against 0.65 ms)."""
    import torch

    n, d, m = shape
    gen = torch.Generator().manual_seed(0)
    q8 = torch.randint(-128, 128, (n, d), dtype=torch.int8, generator=gen)
    b8 = torch.randint(-128, 128, (m, d), dtype=torch.int8, generator=gen)
    q32, b32 = q8.float(), b8.float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = _best_ms(lambda: q32 @ b32.T, repeats)
        try:
            int8 = _best_ms(lambda: torch._int_mm(q8, b8.T), repeats)
        except (AttributeError, RuntimeError):
            int8 = None
    finally:
        torch.set_num_threads(threads)
    return {"int8_ms": int8, "fp32_ms": fp32, "shape": list(shape), "threads": 1}


def _best_ms(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after one warm-up, milliseconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 4)


def _knn_choice(probe: dict, source: str) -> Choice:
    """int8 when the probe's int8 product was faster than its fp32 one."""
    int8, fp32 = probe["int8_ms"], probe["fp32_ms"]
    if int8 is None:
        return Choice("knn", "fp32", source, "torch._int_mm unavailable")
    n, d, m = probe["shape"]
    threads = probe.get("threads", 1)
    detail = f"int8 {int8:.3g} ms, fp32 {fp32:.3g} ms for {n}x{d} by {d}x{m}, {threads} thread{'s' * (threads > 1)}"
    return Choice("knn", "int8" if int8 < fp32 else "fp32", source, detail)


def _cached_or_probed_knn() -> Choice:
    """The cached k-NN probe of this machine, else a new probe, written to the cache (a failed write is only
    a probe again next time)."""
    info = cpu_info()
    path = cache_path(info)
    cached = _read_cache(path)
    if cached is not None:
        return _knn_choice(cached, "cached")
    import torch

    probe = probe_knn()
    measured = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        write_json(path, {"knn": probe, "cpu": info.model, "torch": torch.__version__, "measured": measured})
    except OSError:
        pass
    return _knn_choice(probe, "probe")


def _read_cache(path: Path) -> dict | None:
    """The k-NN probe stored at ``path``, or None when it is missing, unreadable or malformed."""
    try:
        probe = json.loads(path.read_text())["knn"]
        fp32, int8 = float(probe["fp32_ms"]), probe["int8_ms"]
        int8 = None if int8 is None else float(int8)
        shape = [int(s) for s in probe["shape"]]
        threads = int(probe.get("threads", 1))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(shape) != 3:
        return None
    return {"int8_ms": int8, "fp32_ms": fp32, "shape": shape, "threads": threads}


def native_bf16_units() -> list[str]:
    """The CPU's units that compute bfloat16 natively, by torch's own checks: ``avx512_bf16``, ``amx_tile``
    (either gives bf16 autocast its speed-up; with neither bf16 is emulated, slower than fp32)."""
    import torch

    names = {"_is_avx512_bf16_supported": "avx512_bf16", "_is_amx_tile_supported": "amx_tile"}
    passed = []
    for attr, flag in names.items():
        check = getattr(torch.cpu, attr, None)
        try:
            if check is not None and bool(check()):
                passed.append(flag)
        except RuntimeError:
            pass
    return passed
