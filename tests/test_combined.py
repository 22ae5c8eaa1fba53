"""The combined detector: statistics, caching, the mixture, the CLI and its errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_run, write_pooled_sets

from dgmood.app import cli as cli
from dgmood.methods.combined import FEATURES, CombinedConfig, evaluate_combined, to_columns
from dgmood.statistics.knn import knn_distance
from dgmood.models.flow import FlowConfig
from dgmood.evaluation.metrics import METRIC_NAMES
from dgmood.models.network import NetConfig
from dgmood.app.runs import FeatureConfig


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, data_dir):
    paths = write_pooled_sets(tmp_path_factory.mktemp("combined-sets"), data_dir, {
        "train": ("fashion-mnist", 300), "in": ("fashion-mnist:test", 40), "mnist": ("mnist:test", 40)})
    paths["ood"] = (str(paths["mnist"]), "uniform[:40]")
    return paths


@pytest.fixture(scope="module")
def score_run(tmp_path_factory, data_dir, sets):
    return make_tiny_run(tmp_path_factory.mktemp("combined") / "score", data_dir, sets,
                         NetConfig(image_shape=(1, 8, 8), channels=(8, 16)), steps=100,
                         features=FeatureConfig(fit_n=200))


def _ood_args(sets):
    return [a for s in sets["ood"] for a in ("--ood", s)]


def test_cli_default_features_are_the_library_ones():
    assert cli.COMBINED_FEATURES == FEATURES


def test_knn_distance_matches_brute_force_and_leaves_self_out():
    rng = np.random.default_rng(0)
    bank, queries = rng.random((30, 1, 2, 3)), rng.random((7, 1, 2, 3))
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    d = np.linalg.norm(flat(queries)[:, None] - flat(bank)[None], axis=2)
    np.testing.assert_allclose(knn_distance(bank, queries, 3), np.sort(d, axis=1)[:, 2], rtol=1e-10)
    d_self = np.linalg.norm(flat(bank)[:, None] - flat(bank)[None], axis=2)  # column 0 of each sorted row is 0
    np.testing.assert_allclose(knn_distance(bank, bank, 3, exclude_self=True), np.sort(d_self, axis=1)[:, 3],
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 31"):
        knn_distance(bank, queries, 30, exclude_self=True)


def test_columns_are_log_scaled_norms_and_raw_dimensions():
    norms = np.array([[1.0, np.e], [np.e**2, 1.0]])
    np.testing.assert_allclose(to_columns("msma", norms), [[0, 1], [2, 0]])
    np.testing.assert_allclose(to_columns("flipd", np.array([3.0, -1.0])), [[3.0], [-1.0]])
    assert np.isfinite(to_columns("knn", np.array([0.0, 1.0]))).all()  # a duplicate image is not -inf


def test_config_puts_the_knn_column_last():
    assert CombinedConfig(features=("knn", "msma", "flipd")).features == ("msma", "flipd", "knn")


@pytest.mark.parametrize("kwargs, message", [({"features": ("msma", "lpips")}, "unknown combined feature"),
                                             ({"features": ()}, "none given"), ({"knn_k": 0}, "knn_k"),
                                             ({"feature_knn_k": 0}, "feature_knn_k"),
                                             ({"feature_knn_bank": 1}, "feature_knn_bank")])
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CombinedConfig(**kwargs)


def test_cli_writes_metrics_plots_and_report(score_run, data_dir, sets):
    result = invoke("evaluate", "--run", score_run.directory, "--data-dir", data_dir, "--method", "combined",
                    *_ood_args(sets), "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    out = score_run.directory / "combined"
    for name in ["metrics.json", "metrics.csv", "report.md", "report.html", "evaluation.json", "plots/roc.png",
                 "plots/scores.png"]:
        assert (out / name).is_file(), name
    assert (score_run.directory / "detectors" / "combined" / "detector.json").is_file()
    every = json.loads((out / "metrics.json").read_text())
    assert list(every) == ["combined", "msma-knn", "pixel-knn"]  # the default baselines beside it
    metrics = every["combined"]
    assert set(metrics) == set(sets["ood"])
    for values in metrics.values():
        assert set(METRIC_NAMES) <= set(values)
    assert metrics["uniform[:40]"]["auroc"] > 0.9  # noise is far from clothes in every statistic
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert tuple(evaluation["config"]["features"]) == FEATURES
    assert {"flipd", "complexity", "reconstruction", "knn"} <= set(evaluation["seconds_per_image"])
    assert "time per image: flipd" in (out / "report.md").read_text()


def test_second_evaluation_recomputes_and_refits_nothing(score_run, data_dir, sets, monkeypatch):
    import dgmood.detectors.estimators as detectors
    import dgmood.statistics.lens as lens
    import dgmood.statistics.neighbours as neighbours
    import dgmood.statistics.score_norms as features

    config = CombinedConfig(features=("msma", "flipd", "knn"))
    first = evaluate_combined(score_run, config, list(sets["ood"]))

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    for module, name in [(lens, "compute_statistic"), (features, "score_norms"), (neighbours, "kneighbors")]:
        monkeypatch.setattr(module, name, fail)
    second = evaluate_combined(score_run, config, list(sets["ood"]))
    np.testing.assert_array_equal(first.scores["combined"]["in"], second.scores["combined"]["in"])
    monkeypatch.setattr(detectors.GMMDetector, "fit", fail)  # the saved mixture is loaded, not refitted
    third = evaluate_combined(score_run, config, list(sets["ood"]))
    n_norms = len(config.sigmas[::config.combined_sigma_stride])  # every second of the ten σ
    # score norms, FLIPD, then the raw-pixel term's two columns (local residual, distance)
    assert third.detector.n_features_in_ == n_norms + 1 + 2 and third.detector.distance_columns == 2
    np.testing.assert_allclose(third.scores["combined"]["in"], first.scores["combined"]["in"], rtol=1e-12)


def test_feature_subset_changes_the_mixture_and_extra_sets_are_scored(score_run, sets):
    x_in = np.load(sets["in"]).transpose(0, 3, 1, 2)
    ev = evaluate_combined(score_run, CombinedConfig(features=("complexity", "knn")), [],
                           extra_sets={"inverted-test": lambda: 1.0 - x_in})
    assert ev.detector.n_features_in_ == 3 and ev.detector.distance_columns == 2  # complexity; residual, distance
    assert ev.scores["combined"]["ood"]["inverted-test"].shape == (40,)
    assert 0.0 <= ev.results["combined"]["inverted-test"]["auroc"] <= 1.0


def test_flow_run_and_bad_features_are_clean_cli_errors(tmp_path, data_dir, sets, score_run):
    flow = make_tiny_run(tmp_path / "flow", data_dir, sets, FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=8, bins=4),
                         2, features=FeatureConfig(fit_n=200))
    result = invoke("evaluate", "--run", flow.directory, "--data-dir", data_dir, "--method", "combined", "--quiet")
    assert result.exit_code != 0 and "needs a score model" in result.output
    result = invoke("evaluate", "--run", score_run.directory, "--data-dir", data_dir, "--method", "combined",
                    "--features", "msma,lpips", "--quiet")
    assert result.exit_code == 2 and "unknown combined feature" in result.output
