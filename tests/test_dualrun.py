"""The dual-threshold evaluation end to end: flow and diffusion lenses, calibration, caching, CLI, errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_run, write_pooled_sets

from dgmood.app.cli import main
from dgmood.methods.dual_threshold import DualConfig, evaluate_dual
from dgmood.models.flow import FlowConfig
from dgmood.statistics.lens import LensConfig, StatCache
from dgmood.evaluation.metrics import METRIC_NAMES
from dgmood.models.network import NetConfig


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, data_dir):
    """Paths of 8×8 FashionMNIST train/test and MNIST test sets as .npy files, and the OOD specs."""
    paths = write_pooled_sets(tmp_path_factory.mktemp("sets"), data_dir, {
        "train": ("fashion-mnist", 300), "in": ("fashion-mnist:test", 16), "mnist": ("mnist:test", 16)})
    paths["ood"] = (str(paths["mnist"]), "uniform[:16]")
    return paths


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, data_dir, sets):
    net = FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=8, bins=4)
    return make_tiny_run(tmp_path_factory.mktemp("dual") / "flow", data_dir, sets, net, steps=40)


@pytest.fixture(scope="module")
def score_run(tmp_path_factory, data_dir, sets):
    net = NetConfig(image_shape=(1, 8, 8), channels=(8, 16))
    return make_tiny_run(tmp_path_factory.mktemp("dual") / "score", data_dir, sets, net, steps=150)


def _check_outputs(directory, methods, ood):
    for name in ["metrics.json", "metrics.csv", "report.md", "report.html", "calibration.json", "evaluation.json",
                 "plots/pairs.png", "plots/dual_roc.png", "plots/roc.png", "plots/scores.png"]:
        assert (directory / name).is_file(), name
    # written by the one output step of every evaluation (evaluation.write_evaluation)
    assert json.loads((directory / "evaluation.json").read_text())["methods"][0] == "dual-threshold"
    page = (directory / "report.html").read_text()
    assert page.count("Most in-distribution-looking") == len(ood) and "Most atypical" in page
    assert page.count("data:image/png") == 4 + 16 * (1 + len(ood))  # ROC, scores, pairs, dual ROC; 16 tiles per set
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(methods) <= set(metrics)
    for ood in ood:
        dual = metrics["dual-threshold"][ood]
        assert list(dual) == [*METRIC_NAMES, "auroc_optimal_dual"]
        # the optimal dual ROC dominates thresholding the likelihood alone (a tie-free statistic; the integer
        # LID is not compared: its AUROC counts ties half, a diagonal the step-interpolated frontier lacks)
        assert dual["auroc_optimal_dual"] >= metrics["likelihood"][ood]["auroc"] - 1e-12
    assert "AUROC opt. dual" in (directory / "report.md").read_text()
    return metrics


def _ood_args(sets):
    return [a for o in sets["ood"] for a in ("--ood", o)]


def test_flow_lens_from_the_cli(flow_run, data_dir, sets):
    result = invoke("evaluate", "--run", flow_run.directory, "--data-dir", data_dir, "--method", "dual-threshold",
                    "--fit-n", 16, *_ood_args(sets), "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    out = flow_run.directory / "dual-flow-jacobian"
    _check_outputs(out, ["dual-threshold", "likelihood", "lid", "grad-norm", "complexity-corrected"], sets["ood"])
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["parameter"] == "tau" and calib["value"] > 0
    # τ is solved exactly: the mean LID over the 80 points is an achievable value (a multiple of 1/80)
    # closest to the target, so within the largest gap between achievable means
    assert abs(calib["achieved"] - calib["target_lpca"]) <= 64 / 80 + 1e-9 or calib["achieved"] in (0, 64)


def test_likelihood_ratio_with_a_background_flow(flow_run, tmp_path, data_dir, sets):
    net = FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=8, bins=4)
    background = make_tiny_run(tmp_path / "background", data_dir, sets, net, steps=20, perturb=0.15)
    config = DualConfig(lens=LensConfig("flow", "jacobian"), fit_n=16, background=str(background.directory))
    ev = evaluate_dual(flow_run, config, list(sets["ood"]))
    in_spec = str(sets["in"])
    own = ev.scores["likelihood"]["in"]
    background_ll = ev.scores["likelihood"]["in"] - ev.scores["likelihood-ratio"]["in"]
    assert np.isfinite(background_ll).all() and not np.allclose(background_ll, own)
    assert set(ev.results["likelihood-ratio"]) == set(sets["ood"]) and ev.pairs[in_spec].shape == (16, 2)
    # a background run must have been trained on perturbed images
    with pytest.raises(ValueError, match="--perturb"):
        evaluate_dual(flow_run, DualConfig(lens=config.lens, fit_n=16, background=str(flow_run.directory)),
                      list(sets["ood"]))


def test_second_evaluation_reuses_every_cached_statistic(flow_run, sets, monkeypatch):
    import dgmood.statistics.lens as lens

    def fail(*args, **kwargs):
        raise AssertionError("a cached statistic was recomputed")

    monkeypatch.setattr(lens, "compute_statistic", fail)
    ev = evaluate_dual(flow_run, DualConfig(lens=LensConfig("flow", "jacobian"), fit_n=16), list(sets["ood"]))
    assert ev.pairs[str(sets["in"])].shape == (16, 2)
    assert set(ev.scores["dual-threshold"]["ood"]) == set(sets["ood"])


def test_diffusion_lens_flipd(score_run, data_dir, sets):
    result = invoke("evaluate", "--run", score_run.directory, "--data-dir", data_dir, "--method", "dual-threshold",
                    "--lens", "diffusion", "--lid", "flipd", "--fit-n", 16, *_ood_args(sets), "--threads", 1,
                    "--quiet")
    assert result.exit_code == 0, result.output
    out = score_run.directory / "dual-diffusion-flipd"
    _check_outputs(out, ["dual-threshold", "likelihood", "lid", "score-norm", "reconstruction"], sets["ood"])
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["parameter"] == "sigma0" and calib["value"] > 0


def test_fixed_step_solver_from_the_cli(score_run, data_dir, sets):
    result = invoke("evaluate", "--run", score_run.directory, "--data-dir", data_dir, "--method", "dual-threshold",
                    "--lens", "diffusion", "--solver", "heun:4:geometric", "--fit-n", 16, *_ood_args(sets),
                    "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert "heun, 4 geometric steps" in (score_run.directory / "dual-diffusion-flipd" / "report.md").read_text()


@pytest.mark.parametrize("spec", ["rk4", "heun:0", "heun:8:log", "adaptive:8", "heun:8:uniform:2"])
def test_bad_solver_is_a_one_line_error(score_run, data_dir, sets, spec):
    result = invoke("evaluate", "--run", score_run.directory, "--data-dir", data_dir, "--method", "dual-threshold",
                    "--solver", spec, *_ood_args(sets), "--quiet")
    assert result.exit_code == 2 and "is not a solver" in result.output and "Traceback" not in result.output


def test_diffusion_lens_normal_bundle(score_run, sets):
    config = DualConfig(lens=LensConfig("diffusion", "normal-bundle", n_perturb=32), fit_n=16, calibration_n=20)
    ev = evaluate_dual(score_run, config, list(sets["ood"]))
    lid = ev.pairs[str(sets["in"])][:, 1]
    assert ((lid >= 64 - 32) & (lid <= 64)).all() and np.allclose(lid, lid.round())
    assert ev.calibration["parameter"] == "tau"


def test_stat_cache_ignores_damaged_or_foreign_files(tmp_path):
    cache = StatCache(tmp_path, "sha-a")
    cache.save("grad_norm", {}, "mnist", np.arange(3.0))
    assert cache.load("grad_norm", {}, "mnist")[0].tolist() == [0.0, 1.0, 2.0]
    assert StatCache(tmp_path, "sha-b").load("grad_norm", {}, "mnist") is None
    cache.path("grad_norm", {}, "mnist").write_bytes(b"not a zip")
    with pytest.warns(RuntimeWarning, match="is damaged"):
        assert cache.load("grad_norm", {}, "mnist") is None


@pytest.mark.parametrize("args, message", [
    (["--lens", "diffusion"], "needs a score model"),
    (["--lid", "flipd"], "does not work with the flow lens"),
])
def test_mismatched_lens_is_a_clean_error(flow_run, data_dir, sets, args, message):
    result = invoke("evaluate", "--run", flow_run.directory, "--data-dir", data_dir, "--method", "dual-threshold",
                    *args, "--ood", "uniform[:4]", "--quiet")
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_every_evaluation_has_the_one_guard(flow_run, score_run):
    calls = [lambda: evaluate_dual(flow_run, DualConfig(lens=LensConfig("flow", "jacobian"), fit_n=16), []),
             lambda: score_run.evaluate_methods(["pixel-knn"], []), lambda: score_run.evaluate([])]
    for call in calls:
        with pytest.raises(ValueError, match="^no OOD set given; name at least one with --ood SPEC$"):
            call()


@pytest.mark.parametrize("method", ["msma", "combined", "msma-knn"])
def test_score_model_methods_on_a_flow_run_are_clean_errors(flow_run, data_dir, method):
    result = invoke("evaluate", "--run", flow_run.directory, "--data-dir", data_dir, "--method", method, "--quiet")
    assert result.exit_code == 1 and "--method dual-threshold" in result.output


def test_run_command_trains_a_flow_and_evaluates_the_dual_threshold(tmp_path, data_dir, sets):
    run_dir = tmp_path / "flow-run"
    # the first 100 training images: the dual threshold takes a Jacobian of the CLI's default flow per training image
    result = invoke("run", "--run", run_dir, "--data-dir", data_dir, "--model", "flow",
                    "--data", f"{sets['train']}[:100]", "--in", sets["in"], *_ood_args(sets), "--steps", 3,
                    "--batch-size", 32, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "config.json").read_text())["net"]["kind"] == "flow"
    assert "dual-threshold" in json.loads((run_dir / "dual-flow-jacobian" / "metrics.json").read_text())
