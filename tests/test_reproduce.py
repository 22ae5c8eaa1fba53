"""MSMA reproduction: the analytic 1-D toy and the table/figure functions on tiny synthetic inputs."""

import numpy as np
import pytest
import torch
from conftest import load_script

from reproduction import msma as rp
from dgmood.statistics.score_norms import score_norms
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.data.toy import (MSMA_TOY_POINTS, MSMA_TOY_SIGMAS, smoothed_mixture_log_density, smoothed_mixture_score,
                        smoothed_mixture_score_norm)

SIGMA_L, SIGMA_M, SIGMA_H = MSMA_TOY_SIGMAS


# ----------------------------------------------------------------------------- the toy math


@pytest.mark.parametrize("sigma", [0.0, SIGMA_L, SIGMA_M, SIGMA_H])
def test_smoothed_density_integrates_to_one(sigma):
    x = np.linspace(-300.0, 360.0, 200_001)
    p = np.exp(smoothed_mixture_log_density(x, sigma))
    assert np.sum(np.diff(x) * (p[1:] + p[:-1]) / 2) == pytest.approx(1.0, abs=1e-6)  # trapezoid rule


@pytest.mark.parametrize("sigma", [SIGMA_L, 1.0, SIGMA_M, SIGMA_H])
def test_score_is_the_derivative_of_the_log_density(sigma):
    x, h = np.linspace(-5.0, 65.0, 141), 1e-4
    fd = (smoothed_mixture_log_density(x + h, sigma) - smoothed_mixture_log_density(x - h, sigma)) / (2 * h)
    np.testing.assert_allclose(smoothed_mixture_score(x, sigma), fd, rtol=1e-5, atol=1e-6)


def test_smoothing_a_gaussian_adds_sigma_squared_to_its_variance():
    x = np.array([-1.0, 0.5, 3.0])
    log_p = smoothed_mixture_log_density(x, 2.0, weights=[1.0], means=[0.5], stds=[1.5])
    np.testing.assert_allclose(log_p, -0.5 * np.log(2 * np.pi * 6.25) - 0.5 * (x - 0.5) ** 2 / 6.25)
    np.testing.assert_allclose(smoothed_mixture_score(x, 2.0, [1.0], [0.5], [1.5]), -(x - 0.5) / 6.25)


def test_toy_small_sigma_misses_the_local_mode_large_sigma_sees_it():
    inlier, valley, local_mode = (MSMA_TOY_POINTS[k] for k in ("inlier", "low-density outlier", "local-mode outlier"))
    low = smoothed_mixture_score_norm(np.array([inlier, valley, local_mode]), SIGMA_L)
    assert low[0] < 1e-3 and low[2] < 1e-3  # the local mode looks like the inlier mode at σ_L
    assert low[1] > 100 * max(low[0], low[2])  # the low-density point does not
    high = smoothed_mixture_score_norm(np.array([inlier, local_mode]), SIGMA_H)
    assert high[1] > 10 * high[0]  # at σ_H the local mode stands out
    assert smoothed_mixture_log_density(local_mode, 0.0) > smoothed_mixture_log_density(valley, 0.0) + 10


@pytest.mark.parametrize("kwargs", [dict(weights=[0.5, 0.4]), dict(stds=[2.0, 0.0]), dict(means=[1.0]),
                                    dict(sigma=-1.0)])
def test_toy_rejects_bad_parameters(kwargs):
    args = dict(x=0.0, sigma=1.0) | kwargs
    with pytest.raises(ValueError):
        smoothed_mixture_log_density(**args)


def test_toy_table_and_figure(tmp_path):
    rows = rp.toy_table()
    assert [r["point"] for r in rows] == list(MSMA_TOY_POINTS)
    assert all(set(rp.toy_columns()) <= set(r) for r in rows)
    assert rows[2][f"score_norm@sigma={SIGMA_H:g}"] > rows[0][f"score_norm@sigma={SIGMA_H:g}"]
    assert rp.plot_toy(tmp_path / "toy.png", x=np.linspace(0, 60, 121)).stat().st_size > 0


# ----------------------------------------------------------------------------- the tables on synthetic inputs


def _features(n: int, width: int, shift: float, seed: int) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(shift, 0.3, size=(n, width)))


def test_fig1_table_columns_and_figure(tmp_path):
    sigmas = np.geomspace(1.0, 0.01, 4)
    train, f_in, f_ood = _features(60, 4, 0.0, 0), _features(30, 4, 0.0, 1), _features(30, 4, 1.0, 2)
    rows = rp.fig1_table(train, f_in, f_ood, sigmas)
    assert len(rows) == 5 and all(set(rp.FIG1_COLUMNS) <= set(r) for r in rows)
    assert np.isnan(rows[-1]["auroc_norm"]) and rows[-1]["auroc_knn"] > 0.9
    assert rows[0]["auroc_norm"] > 0.9  # the OOD set has larger norms in every column
    assert rp.plot_fig1(train, f_in, f_ood, sigmas, tmp_path / "fig1.png").stat().st_size > 0
    with pytest.raises(ValueError, match="columns"):
        rp.fig1_table(train, f_in, f_ood, sigmas[:3])


def test_table14_columns_and_paper_numbers(tmp_path):
    rng = np.random.default_rng(0)
    scores = {name: (rng.normal(1, 1, 50), rng.normal(0, 1, 40)) for name in ("gmm", "flow", "knn", "other")}
    rows = rp.table14(scores)
    assert [set(r) for r in rows] == [set(rp.TABLE14_COLUMNS)] * 4
    assert rows[0]["auroc_paper"] == 82.56 and rows[2]["fpr80_paper"] == 43.27
    assert np.isnan(rows[3]["auroc_paper"]) and np.isnan(rows[0]["aupr_in_paper"])
    assert all(0 <= r[k] <= 100 for r in rows for k in ("fpr80", "auroc", "aupr_in"))
    assert rp.plot_table14(scores, tmp_path / "t14.png").stat().st_size > 0
    table = rp.markdown_table(rows, rp.TABLE14_COLUMNS)
    assert table.count("\n") == 5 and "n/a" in table


def test_fig5_grids_follow_the_paper_sweep():
    grids = rp.fig5_grids()
    assert [(g["sweep"], g["L"], g["sigma_high"]) for g in grids] == [
        ("L", 1, 1.0), ("L", 3, 1.0), ("L", 10, 1.0), ("L", 15, 1.0), ("L", 20, 1.0),
        ("sigma_high", 10, 0.5), ("sigma_high", 10, 1.0), ("sigma_high", 10, 2.0), ("sigma_high", 10, 10.0)]
    for g in grids:
        assert len(g["sigmas"]) == g["L"] and g["sigmas"][0] == pytest.approx(g["sigma_high"])
        assert g["L"] == 1 or g["sigmas"][-1] == pytest.approx(0.01)


def test_fig5_table_on_synthetic_features_reuses_repeated_grids(tmp_path):
    calls = []

    def features(role, sigmas):
        calls.append((role, len(sigmas)))
        n, shift = {"train": (40, 0.0), "in": (20, 0.0), "ood": (20, 0.8)}[role]
        return _features(n, len(sigmas), shift, seed=len(calls))

    grids = rp.fig5_grids(l_values=(1, 3), sigma_highs=(1.0, 2.0), l_default=3)  # (L=3, σ_H=1) twice
    rows = rp.fig5_table(features, grids, ("knn", "gmm"))
    assert len(rows) == 4 and len(calls) == 3 * 3
    assert all(set(rp.FIG5_COLUMNS) | {"auroc_knn", "auroc_gmm", "seconds"} <= set(r) for r in rows)
    assert rows[1]["auroc_knn"] == rows[2]["auroc_knn"]
    assert rp.plot_fig5(rows, tmp_path / "fig5.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown detectors"):
        rp.fig5_table(features, grids, ("nope",))


def test_fig5_table_with_a_tiny_score_model():
    torch.manual_seed(0)
    model = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8,), emb_dim=8)).eval()
    with torch.no_grad():  # the zero-initialised head would make every feature 0
        model.head[-1].weight.normal_(0, 0.1)
    images = {"train": torch.rand(12, 1, 8, 8), "in": torch.rand(6, 1, 8, 8), "ood": torch.zeros(6, 1, 8, 8)}
    rows = rp.fig5_table(lambda role, sigmas: score_norms(model, images[role], sigmas),
                         rp.fig5_grids(l_values=(1, 3), sigma_highs=(2.0,), l_default=3), ("knn",))
    assert len(rows) == 3 and all(0.0 <= r["auroc_knn"] <= 1.0 for r in rows)


# ----------------------------------------------------------------------------- the script


def _script():
    return load_script("reproduce")


def test_script_msma_toy_writes_figure_and_table(tmp_path, capsys):
    assert _script().main(["--out", str(tmp_path), "msma-toy"]) == 0
    assert (tmp_path / "msma-toy.png").stat().st_size > 0
    text = (tmp_path / "msma-toy.md").read_text()
    assert "msma-toy" in text and "local-mode outlier" in text and "local-mode outlier" in capsys.readouterr().out


def test_script_without_a_run_fails_with_one_line(tmp_path, capsys):
    assert _script().main(["--out", str(tmp_path), "msma-fig1", "--run", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_script_all_runs_every_command_with_the_shared_options(tmp_path, monkeypatch):
    script, calls = _script(), []
    for name in script.COMMANDS:
        monkeypatch.setattr(script, name.replace("-", "_"), lambda args, n=name: calls.append((n, args.out)))
    assert script.main(["--out", str(tmp_path), "all"]) == 0
    assert calls == [(name, tmp_path) for name in script.COMMANDS]
