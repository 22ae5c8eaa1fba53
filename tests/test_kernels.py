"""Kernel choices: CPU flags from cpuinfo text, the per-machine probe cache, overrides, and `dgmood info`."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dgmood.utils import kernels

X86 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B13
flags		: fpu sse2 avx avx2 fma
processor	: 1
model name	: AMD EPYC 7B13
flags		: fpu sse2 avx avx2 fma
"""
ARM = """processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes sve bf16
CPU implementer	: 0x41
"""


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No override, an empty user cache in tmp_path, no choice remembered by this process."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_MEMO", {})
    return tmp_path


def fake_probe(monkeypatch, int8_ms, fp32_ms=1.0):
    """Replace the probe by one returning these times; returns the list its calls are appended to."""
    calls = []

    def probe():
        calls.append(1)
        return {"int8_ms": int8_ms, "fp32_ms": fp32_ms, "shape": [128, 784, 512], "threads": 1}

    monkeypatch.setattr(kernels, "probe_knn", probe)
    return calls


def test_cpuinfo_text_gives_model_and_flags_of_the_first_processor():
    assert kernels.parse_cpuinfo(X86) == ("AMD EPYC 7B13", frozenset({"fpu", "sse2", "avx", "avx2", "fma"}))
    model, flags = kernels.parse_cpuinfo(ARM)
    assert model == "" and {"asimd", "bf16"} <= flags
    assert kernels.parse_cpuinfo("") == ("", frozenset())


def test_the_fingerprint_names_cpu_flags_and_torch_version():
    cpu = kernels.CpuInfo("AMD EPYC 7B13", frozenset({"avx2"}), "AVX2", "x86_64")
    same = kernels.CpuInfo("AMD EPYC 7B13", frozenset({"avx2"}), "AVX2", "x86_64")
    vnni = kernels.CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "avx512_vnni"}), "AVX2", "x86_64")
    assert cpu.fingerprint("2.5.0") == same.fingerprint("2.5.0")
    assert len({cpu.fingerprint("2.5.0"), vnni.fingerprint("2.5.0"), cpu.fingerprint("2.6.0")}) == 3


def test_overrides_parse_and_bad_ones_are_one_line_errors():
    assert kernels.overrides("knn=fp32, AMP=off") == {"knn": "fp32", "amp": "off"}
    assert kernels.overrides("") == {}
    for bad in ("knn=fast", "speed=max", "knn"):
        with pytest.raises(ValueError, match="DGMOOD_KERNELS has"):
            kernels.overrides(bad)


@pytest.mark.parametrize("int8_ms,expected", [(0.1, "int8"), (16.0, "fp32")])
def test_the_probe_decides_once_then_the_cache_answers(fresh, monkeypatch, int8_ms, expected):
    calls = fake_probe(monkeypatch, int8_ms)
    first = kernels.knn_kernel()
    assert (first.value, first.source, len(calls)) == (expected, "probe", 1)
    assert kernels.knn_kernel() is first and len(calls) == 1  # remembered by the process
    monkeypatch.setattr(kernels, "_MEMO", {})
    again = kernels.knn_kernel()
    assert (again.value, again.source, len(calls)) == (expected, "cached", 1)  # read back by a new process
    (path,) = (fresh / "dgmood" / "kernels").glob("*.json")
    assert path == kernels.cache_path() and json.loads(path.read_text())["knn"]["int8_ms"] == int8_ms


@pytest.mark.parametrize("damage", ["{not json", '{"knn": {"fp32_ms": "x"}}', "[1, 2]", '{"knn": null}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(fresh, monkeypatch, damage):
    path = kernels.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    calls = fake_probe(monkeypatch, 0.1)
    assert kernels.knn_kernel().source == "probe" and len(calls) == 1
    assert json.loads(path.read_text())["knn"]["fp32_ms"] == 1.0


def test_an_unwritable_cache_only_means_probing_again(fresh, monkeypatch):
    (fresh / "dgmood").write_text("a file where the cache folder should be")
    fake_probe(monkeypatch, 0.1)
    assert kernels.knn_kernel().value == "int8"


def test_without_int_mm_the_search_is_fp32(fresh, monkeypatch):
    fake_probe(monkeypatch, None)
    assert (kernels.knn_kernel().value, kernels.knn_kernel().detail) == ("fp32", "torch._int_mm unavailable")


def test_overrides_come_before_cache_probe_and_feature_rules(fresh, monkeypatch):
    calls = fake_probe(monkeypatch, 0.1)
    monkeypatch.setenv(kernels.ENV, "knn=fp32,amp=off,runtime=torch")
    assert [(c.name, c.value, c.source) for c in kernels.choices()] == [
        ("knn", "fp32", "override"), ("amp", "off", "override"), ("runtime", "torch", "override")]
    assert not calls
    monkeypatch.setenv(kernels.ENV, "amp=on")
    assert kernels.knn_kernel().source == "probe" and kernels.amp().value == "on"


def test_amp_and_runtime_defaults_follow_the_override(fresh, monkeypatch):
    from conftest import random_head_net
    from dgmood.models.exported import onnx_available, resolve_runtime
    from dgmood.models.train import default_amp, native_bf16

    net = random_head_net((1, 8, 8), channels=(8, 16))
    assert kernels.amp().value == ("on" if native_bf16("cpu") else "off")
    assert default_amp("cpu") is native_bf16("cpu")
    monkeypatch.setenv(kernels.ENV, "amp=off,runtime=torch")
    assert default_amp("cpu") is False
    assert resolve_runtime("auto", net, "cpu") == "torch"
    if onnx_available():
        assert resolve_runtime("onnx", net, "cpu") == "onnx"  # an explicit runtime beats the override
        monkeypatch.setenv(kernels.ENV, "runtime=onnx")
        assert resolve_runtime("auto", net, "cpu") == "onnx"


def test_the_real_probe_is_short_and_times_both_products():
    import time

    start = time.perf_counter()
    probe = kernels.probe_knn((32, 784, 64), repeats=2)
    assert time.perf_counter() - start < 1.0
    assert probe["fp32_ms"] > 0 and probe["shape"] == [32, 784, 64] and probe["threads"] == 1
    assert probe["int8_ms"] is None or probe["int8_ms"] > 0


def test_dgmood_info_prints_flags_and_each_choice_with_its_source(fresh):
    from dgmood.app.cli import main

    result = CliRunner().invoke(main, ["info"], env={kernels.ENV: "knn=fp32"})
    assert result.exit_code == 0, result.output
    for text in ("dgmood ", "torch ", "cpu: ", "avx512_vnni", "amx_bf16", "knn: fp32 (override",
                 "amp: ", "runtime: ", "threads: ", "kernel cache: "):
        assert text in result.output
    result = CliRunner().invoke(main, ["info"], env={kernels.ENV: "knn=fast"})
    assert result.exit_code == 1 and "DGMOOD_KERNELS has 'knn=fast'" in result.output


def test_dgmood_info_runs_the_probe_then_reads_the_cache(fresh):
    from dgmood.app.cli import main

    first = CliRunner().invoke(main, ["info"]).output
    assert "knn: " in first and "(probe: " in first
    kernels._MEMO.clear()
    assert "(cached: " in CliRunner().invoke(main, ["info"]).output
    assert np.isfinite(json.loads(kernels.cache_path().read_text())["knn"]["fp32_ms"])
