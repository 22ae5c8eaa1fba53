"""End-to-end CLI: a tiny model through every command, and clean one-line errors on bad input."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dgmood.app.cli import main
from dgmood.evaluation.metrics import METRIC_NAMES

# Trained and fitted on the first 300 training images only: the combined detector's statistics fit on the whole
# training set (FLIPD's LPCA target on 10,000 of 60,000 images took 13 of the evaluate test's 26 s).
TINY = ["--data", "fashion-mnist[:300]", "--steps", "6", "--batch-size", "32", "--channels", "8,16", "--fit-n", "300",
        "--threads", "1", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("run") / "tiny"
    result = invoke("run", "--run", run, "--data-dir", data_dir, *TINY, "--in", "fashion-mnist:test[:200]",
                    "--ood", "mnist:test[:200]", "--ood", "uniform[:100]", "--method", "msma",
                    "--detectors", "gmm,knn")
    assert result.exit_code == 0, result.output
    return run


def test_run_writes_every_output(run_dir):
    for name in ["config.json", "checkpoint/weights.safetensors", "checkpoint/checkpoint.json", "metrics.json",
                 "metrics.csv", "report.md", "report.html", "plots/roc.png", "plots/histograms.png", "plots/embedding.png",
                 "detectors/msma-gmm/detector.json", "detectors/msma-knn/estimator/arrays.safetensors"]:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"gmm", "knn"}
    assert set(metrics["knn"]) == {"mnist:test[:200]", "uniform[:100]"}
    assert list(metrics["gmm"]["uniform[:100]"]) == list(METRIC_NAMES)
    assert all(0.0 <= v <= 1.0 for d in metrics.values() for m in d.values() for v in m.values())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["net"]["channels"] == [8, 16] and config["train"]["steps"] == 6
    page = (run_dir / "report.html").read_text()  # the one output step: galleries of the first detector (gmm)
    assert "Most atypical: fashion-mnist:test[:200]" in page and "Most in-distribution-looking: uniform[:100]" in page
    assert page.count("data:image/png") == 4 + 3 * 16  # ROC, scores, histograms, 2-D view; 16 tiles per set
    assert "| gmm" in (run_dir / "report.md").read_text()


def test_evaluate_custom_npy_set_and_report_reuse_cache(run_dir, tmp_path, data_dir):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "blobs.npy", (rng.random((50, 28, 28)) * 255).astype(np.uint8))
    result = invoke("evaluate", "--run", run_dir, "--data-dir", data_dir, "--threads", "1", "--quiet",
                    "--in", "fashion-mnist:test[:200]", "--ood", tmp_path / "blobs.npy")
    assert result.exit_code == 0, result.output
    assert "blobs.npy" in result.output
    n_cached = len(list((run_dir / "features").glob("*.npz")))
    result = invoke("report", "--run", run_dir, "--data-dir", data_dir, "--threads", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(list((run_dir / "features").glob("*.npz"))) == n_cached


def test_fit_and_features_commands(run_dir, data_dir):
    result = invoke("features", "--run", run_dir, "--data-dir", data_dir, "--threads", "1", "--quiet",
                    "--data", "constant[:20]")
    assert result.exit_code == 0 and "20 × 10" in result.output, result.output
    result = invoke("fit", "--run", run_dir, "--data-dir", data_dir, "--threads", "1", "--quiet",
                    "--detectors", "knn")
    assert result.exit_code == 0 and "msma-knn: fitted" in result.output, result.output


def test_dry_run_prints_resolved_config(tmp_path, data_dir):
    result = invoke("train", "--run", tmp_path / "r", "--data-dir", data_dir, "--dry-run", "--steps", "7")
    assert result.exit_code == 0
    assert json.loads(result.output)["train"]["steps"] == 7
    assert not (tmp_path / "r").exists()


def test_mixed_precision_defaults_to_the_cpus_native_bf16(tmp_path, data_dir):
    from dgmood.models.train import native_bf16

    def amp(*flags):
        result = invoke("train", "--run", tmp_path / "r", "--data-dir", data_dir, "--dry-run", *flags)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["train"]["amp"]

    assert amp() is native_bf16("cpu")
    assert amp("--amp") is True and amp("--no-amp") is False
    assert amp("--model", "flow", "--data", "constant[:20]") is False  # the flow always trains in fp32


def _bad_inputs(tmp_path):
    nan = np.zeros((5, 28, 28), np.float32)
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "big.npy", np.zeros((5, 32, 32), np.uint8))
    np.save(tmp_path / "range.npy", np.full((5, 28, 28), 2.0, np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((5, 28), np.uint8))
    np.save(tmp_path / "two.npy", np.zeros((5, 28, 28, 2), np.uint8))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "big.npy").read_bytes()[:100])
    return {
        tmp_path / "nan.npy": "nan",
        tmp_path / "two.npy": "c = 1 or 3",  # (a 32x32 set is no longer an error: the run's resize policy crops it)
        tmp_path / "range.npy": "[0, 1]",
        tmp_path / "shape.npy": "shape",
        tmp_path / "trunc.npy": "trunc.npy",
        "mnist[5:5]": "no images",
        "cifar-11": "unknown",
    }


def test_bad_ood_inputs_give_one_clean_line(run_dir, tmp_path, data_dir):
    for spec, phrase in _bad_inputs(tmp_path).items():
        result = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--data-dir", str(data_dir),
                                           "--threads", "1", "--quiet", "--ood", str(spec)])
        assert result.exit_code == 1, (spec, result.output)
        assert "Traceback" not in result.output
        error = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and phrase.lower() in error[0].lower(), (spec, result.output)


def test_missing_run_and_missing_data_are_clean_errors(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", "--run", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "dgmood train" in result.output
    result = CliRunner().invoke(main, ["train", "--run", str(tmp_path / "r"), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "dgmood data download" in result.output


def test_wrong_channels_and_corrupt_idx_are_clean_errors(run_dir, tmp_path, data_dir):
    np.save(tmp_path / "four.npy", np.zeros((4, 28, 28, 4), np.uint8))
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    for spec, phrase in [(tmp_path / "four.npy", "C = 1 or 3"), (tmp_path / "bad-images-idx3-ubyte", "bad-images")]:
        result = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--data-dir", str(data_dir),
                                           "--threads", "1", "--quiet", "--ood", str(spec)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert phrase in result.output, result.output


def test_other_sigma_grid_without_retraining(run_dir, data_dir):
    weights = (run_dir / "checkpoint" / "weights.safetensors").read_bytes()
    result = invoke("evaluate", "--run", run_dir, "--data-dir", data_dir, "--threads", "1", "--quiet",
                    "--in", "fashion-mnist:test[:200]", "--ood", "uniform[:100]", "--n-sigmas", "4",
                    "--sigma-max", "2", "--method", "msma")
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "config.json").read_text())["features"]
    assert (config["n_sigmas"], config["sigma_max"]) == (4, 2.0)
    for name in json.loads((run_dir / "config.json").read_text())["detectors"]:
        saved = json.loads((run_dir / "detectors" / f"msma-{name}" / "detector.json").read_text())
        assert len(saved["columns"]) == 4 and len(saved["statistics"][0]["params"]["sigmas"]) == 4
    assert (run_dir / "checkpoint" / "weights.safetensors").read_bytes() == weights
