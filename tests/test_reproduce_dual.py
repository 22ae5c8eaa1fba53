"""Dual-threshold reproduction: table functions on known cases, sample and statistic caching, the four commands
end to end on tiny 8×8 runs with stored dual evaluations."""

import json

import numpy as np
import pytest
import torch
from conftest import load_script

from dgmood.statistics import lens as lens_module
from reproduction import dual as rd
from dgmood.data.datasets import load_images
from dgmood.methods.dual_threshold import DualConfig, evaluate_dual, write_dual_outputs
from dgmood.models.flow import FlowConfig
from dgmood.statistics.lens import LensConfig
from dgmood.models.network import NetConfig
from dgmood.app.runs import Run, RunConfig
from dgmood.models.train import TrainConfig

# ----------------------------------------------------------------------------- pure functions


def test_quantize_gives_8_bit_levels_in_the_unit_interval():
    q = rd.quantize(np.array([-0.2, 0.0, 0.5, 0.999, 1.3]))
    np.testing.assert_allclose(q * 255, np.round(q * 255), atol=1e-4)
    np.testing.assert_allclose(q, [0, 0, 128 / 255, 1, 1], atol=1e-6)
    assert q.dtype == np.float32


def test_hist_rows_state_the_likelihood_order():
    """OOD with fewer bits/dim than every test image and samples with more than both: P = 1 and P = 0."""
    bpd = {"flow": {"in": np.array([2.0, 3.0, 4.0]), "ood": np.array([1.0, 1.5]), "generated": np.array([5.0, 6.0])}}
    rows = {r["set"]: r for r in rd.hist_rows(bpd)}
    assert set(rows) == set(rd.SET_LABELS.values())
    assert set(rd.HIST_COLUMNS) <= set(rows["OOD"])
    assert rows["in-dist. test"]["above_in"] == 0.5 and rows["OOD"]["above_ood"] == 0.5
    assert rows["OOD"]["above_in"] == 1.0
    assert rows["generated"]["above_in"] == 0.0 and rows["generated"]["above_ood"] == 0.0
    assert rows["in-dist. test"]["median"] == 3.0 and rows["generated"]["n"] == 2


def test_task_row_on_a_likelihood_paradox():
    """OOD with higher likelihood but lower LID: likelihood alone inverts, LID and the dual threshold separate."""
    rng = np.random.default_rng(0)
    pairs_in = np.column_stack([rng.normal(0, 1, 200), rng.normal(10, 1, 200)])
    pairs_ood = np.column_stack([rng.normal(3, 1, 150), rng.normal(2, 1, 150)])
    fit = np.column_stack([rng.normal(0, 1, 300), rng.normal(10, 1, 300)])
    row = rd.task_row(pairs_in, pairs_ood, fit)
    assert row["n_in"] == 200 and row["n_ood"] == 150
    assert row["auroc_likelihood"] < 0.1
    assert row["auroc_lid"] == 1.0 and row["auroc_optimal_dual"] == 1.0
    assert row["auroc_detector"] > 0.9 and len(row["thresholds"]) == 2


# ----------------------------------------------------------------------------- tiny runs with stored evaluations


def _small(spec: str, data_dir, n: int) -> np.ndarray:
    """Real images average-pooled to 8×8 (D = 64), as (N, H, W, C) .npy content."""
    x = torch.from_numpy(load_images(spec, data_dir)[:n])
    return torch.nn.functional.adaptive_avg_pool2d(x, 8).numpy().transpose(0, 2, 3, 1)


N_TEST = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """A tiny flow run and a tiny score run on 8×8 FashionMNIST, each with a stored dual evaluation."""
    root = tmp_path_factory.mktemp("dual-repro")
    paths = {}
    for name, spec, n in [("train", "fashion-mnist", 200), ("test", "fashion-mnist:test", N_TEST),
                          ("mnist", "mnist:test", N_TEST)]:
        paths[name] = root / f"{name}.npy"
        np.save(paths[name], _small(spec, data_dir, n))
    out = {"paths": paths}
    for kind, net, steps in [("flow", FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=8, bins=4), 5),
                             ("score", NetConfig(image_shape=(1, 8, 8), channels=(8, 16)), 60)]:
        run = Run(root / kind, data_dir=data_dir, progress=False)
        run.create(RunConfig(data=str(paths["train"]), in_test=str(paths["test"]), net=net,
                             train=TrainConfig(steps=steps, batch_size=32, warmup=2, checkpoint_every=steps)))
        run.train()
        lens = LensConfig(lens="flow", lid="jacobian") if kind == "flow" else LensConfig(
            lens="diffusion", lid="flipd", solver="euler", probes=1)
        config = DualConfig(lens=lens, fit_n=N_TEST, calibration_n=16, lpca_queries=16, lpca_pool=200,
                            lpca_neighbors=40)
        ev = evaluate_dual(run, config, [str(paths["mnist"])], str(paths["test"]))
        write_dual_outputs(run, config, ev, str(paths["test"]), 0.0)
        out[kind] = root / kind
    return out


def _script():
    return load_script("reproduce")


def _command(runs, name, out, *extra):
    paths = runs["paths"]
    args = ["--out", str(out), name, "--score-run", str(runs["score"]), "--flow-run", str(runs["flow"])]
    if name != "dual-scatter":
        args += ["--in", str(paths["test"]), "--ood", str(paths["mnist"]), "--diffusion-n", str(N_TEST),
                 "--flow-n", str(N_TEST), "--diffusion-gen", "6", "--flow-gen", "6"]
    assert _script().main(args + list(extra)) == 0
    return _table_rows((out / f"{name}.md").read_text())


def _table_rows(markdown: str) -> list[list[str]]:
    """Body cells of the first markdown table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _no_network(monkeypatch):
    """Make every statistic and every sample set a cache hit or an error."""
    def fail(*args, **kwargs):
        raise AssertionError("a statistic or a sample set was recomputed instead of read from the cache")

    monkeypatch.setattr(lens_module, "compute_statistic", fail)
    monkeypatch.setattr(rd, "draw_samples", fail)


def test_generated_set_is_drawn_once_and_cached(runs, monkeypatch):
    run = Run(runs["score"], progress=False)
    name, images = rd.generated_set(run, 5, seed=3)
    first = images()
    assert name.startswith("generated:score-n5-seed3-") and first.shape == (5, 1, 8, 8)
    assert first.min() >= 0 and first.max() <= 1
    np.testing.assert_allclose(first * 255, np.round(first * 255), atol=1e-4)
    monkeypatch.setattr(rd, "draw_samples", lambda *a, **k: pytest.fail("samples were redrawn"))
    np.testing.assert_array_equal(rd.generated_set(run, 5, seed=3)[1](), first)
    assert rd.generated_set(run, 5, seed=4)[0] != name  # the seed is part of the key


def test_dual_hist_and_gen_write_figures_tables_and_reuse_the_cache(runs, tmp_path, monkeypatch):
    calibration = runs["flow"] / "dual-flow-jacobian" / "calibration.json"
    stamp = calibration.stat().st_mtime_ns
    hist = _command(runs, "dual-hist", tmp_path)
    assert len(hist) == 6 and {r[0] for r in hist} == {"diffusion", "flow"}
    for row in hist:
        assert row[2] == (str(N_TEST) if row[1] != "generated" else "6")
        assert all(0 <= float(v) <= 1 for v in row[-2:])
        assert float(row[5]) <= float(row[4]) <= float(row[6])  # 5 % ≤ median ≤ 95 %
    assert {r[7] for r in hist if r[1] == "in-dist. test"} == {"0.500"}

    gen = _command(runs, "dual-gen", tmp_path)
    assert [r[1] for r in gen] == ["train-test vs mnist", "train-gen vs mnist"] * 2  # the paper's task names
    assert [r[2] for r in gen] == [str(N_TEST), "6"] * 2
    assert all(0 <= float(v) <= 1 for r in gen for v in r[4:])
    for name in ("dual-hist", "dual-gen"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"{name}.md").read_text().startswith("<!-- python benchmarks/reproduce.py ")
    assert calibration.stat().st_mtime_ns == stamp  # τ / σ₀ read, not recalibrated

    _no_network(monkeypatch)  # second run: every statistic and sample from the caches
    assert _command(runs, "dual-gen", tmp_path / "again") == gen


def test_dual_ablation_sweeps_the_parameter_around_the_calibrated_value(runs, tmp_path):
    rows = _command(runs, "dual-ablation", tmp_path, "--factors", "0.1,1,10")
    assert len(rows) == 6 and [r[3] for r in rows] == ["0.1", "1", "10"] * 2
    stored = json.loads((runs["flow"] / "dual-flow-jacobian" / "calibration.json").read_text())
    flow = [r for r in rows if r[0] == "flow"]
    assert float(flow[1][2]) == pytest.approx(stored["value"], rel=1e-3)
    assert float(flow[1][4]) == pytest.approx(stored["achieved"], abs=0.05)  # the calibrated mean LID
    assert float(flow[0][4]) >= float(flow[1][4]) >= float(flow[2][4])  # LID = #{s > τ} falls with τ
    assert all(0 <= float(v) <= 1 for r in rows for v in r[6:])
    assert (tmp_path / "dual-ablation.png").is_file()


def test_dual_scatter_redraws_the_stored_evaluations(runs, tmp_path, monkeypatch):
    _no_network(monkeypatch)  # the stored evaluations' statistics are all cached
    rows = _command(runs, "dual-scatter", tmp_path)
    assert [r[0] for r in rows] == ["diffusion", "flow"]
    for lens, row in zip(("diffusion", "flow"), rows):
        metrics = json.loads((runs["score" if lens == "diffusion" else "flow"] / f"dual-{lens}-"
                              f"{'flipd' if lens == 'diffusion' else 'jacobian'}" / "metrics.json").read_text())
        ood = next(iter(metrics["likelihood"]))
        assert float(row[2]) == pytest.approx(metrics["likelihood"][ood]["auroc"], abs=1e-4)
        assert float(row[5]) == pytest.approx(metrics["dual-threshold"][ood]["auroc_optimal_dual"], abs=1e-4)
        for kind in ("scatter", "roc"):
            assert (tmp_path / f"dual-{kind}-{lens}.png").is_file()


def test_a_run_without_a_stored_evaluation_fails_with_one_line(runs, tmp_path, capsys):
    args = ["--out", str(tmp_path), "dual-gen", "--lenses", "flow", "--flow-run", str(tmp_path / "nothing")]
    assert _script().main(args) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no stored dual evaluation"):
        rd.stored_dual(Run(runs["flow"]), lid="normal-bundle")
