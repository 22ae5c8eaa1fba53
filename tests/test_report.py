"""Tests for dgmood.evaluation.report: metric files and tables, plot files, report.md, train-only embedding fit."""

import csv
import json
import os

import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.decomposition import PCA

from dgmood.evaluation import report
from dgmood.utils import files
from dgmood.evaluation.metrics import METRIC_NAMES, evaluate
from dgmood.evaluation.report import (
    embed_2d,
    format_table,
    metrics_table,
    plot_embedding,
    plot_histograms,
    plot_roc,
    write_metrics,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIGMAS = np.geomspace(1.0, 0.01, 4)


def _metrics(auroc, fpr95):
    values = dict(auroc=auroc, aupr_in=0.5, aupr_out=0.25, fpr_at_95_tpr=fpr95, fpr_at_80_tpr=0.05,
                  detection_error=0.0625)
    return {m: values[m] for m in METRIC_NAMES}


@pytest.fixture
def results():
    return {
        "gmm": {"mnist:test": _metrics(0.91234, 0.1134), "uniform": _metrics(np.float64(1.0), 0)},
        "knn": {"mnist:test": _metrics(0.87, 0.3)},
    }


def _features(rng, n, scale):
    """Positive (n, L) score-norm-like features; ``scale`` shifts the log-norms."""
    return np.exp(rng.normal(np.log(scale) - np.log(SIGMAS) / 2, 0.3, size=(n, len(SIGMAS))))


def _assert_png(path, min_side=100):
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= min_side
    assert image.std() > 0  # not a blank canvas


def test_metrics_table_rows(results):
    rows = metrics_table(results)
    pairs = [(r["detector"], r["ood"]) for r in rows]
    assert pairs == [("gmm", "mnist:test"), ("gmm", "uniform"), ("knn", "mnist:test")]
    assert list(rows[0]) == ["detector", "ood", *METRIC_NAMES]
    assert rows[1]["fpr_at_95_tpr"] == 0.0 and type(rows[1]["auroc"]) is float


def test_metrics_table_missing_metric():
    with pytest.raises(KeyError, match="auroc"):
        metrics_table({"gmm": {"x": {m: 0.5 for m in METRIC_NAMES if m != "auroc"}}})


def test_write_metrics_json_schema(tmp_path, results):
    json_path, csv_path = write_metrics(tmp_path, results)
    assert json_path == tmp_path / "metrics.json" and csv_path == tmp_path / "metrics.csv"
    loaded = json.loads(json_path.read_text())
    assert list(loaded) == ["gmm", "knn"]
    assert list(loaded["gmm"]) == ["mnist:test", "uniform"] and list(loaded["knn"]) == ["mnist:test"]
    for per_ood in loaded.values():
        for metrics in per_ood.values():
            assert list(metrics) == list(METRIC_NAMES)
            assert all(type(v) is float for v in metrics.values())
    assert loaded["gmm"]["mnist:test"]["auroc"] == 0.91234
    assert loaded["gmm"]["uniform"]["fpr_at_95_tpr"] == 0.0


def test_write_metrics_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    results = {
        d: {o: evaluate(rng.normal(1, 1, 50), rng.normal(0, 1, 40)) for o in ("a:test", "b")} for d in ("gmm", "flow")
    }
    _, csv_path = write_metrics(tmp_path, results)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["detector", "ood", *METRIC_NAMES]
        back = list(reader)
    assert [(r["detector"], r["ood"]) for r in back] == [(d, o) for d in results for o in results[d]]
    for r in back:
        assert {m: float(r[m]) for m in METRIC_NAMES} == results[r["detector"]][r["ood"]]  # exact


def test_write_metrics_atomic(tmp_path, results, monkeypatch):
    write_metrics(tmp_path, results)
    before = (tmp_path / "metrics.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_metrics(tmp_path, {"other": results["gmm"]})
    assert (tmp_path / "metrics.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "metrics.json"]  # no temp files left
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


def test_format_table_text(results):
    text = format_table(metrics_table(results))
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    assert "AUROC" in lines[0] and set(lines[1]) <= {"-", " "}
    assert "0.9123" in text and "11.3%" in text and "0.0%" in text and "1.0000" in text and "6.2%" in text
    assert lines[2].startswith("gmm") and "mnist:test" in lines[2]
    # Right-aligned metric columns end at the same position.
    assert len({len(line) for line in lines}) == 1


def test_format_table_markdown(results):
    text = format_table(metrics_table(results), "markdown")
    lines = text.splitlines()
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({line.count("|") for line in lines}) == 1
    assert set(lines[1]) <= {"|", "-", ":", " "} and "---:" in lines[1]
    assert "| gmm" in text and "0.9123" in text and "11.3%" in text


def test_format_table_bad_format(results):
    with pytest.raises(ValueError, match="fmt"):
        format_table(metrics_table(results), "html")


def test_format_table_nan():
    row = {"detector": "d", "ood": "o", **{m: float("nan") for m in METRIC_NAMES}}
    assert "n/a" in format_table([row])


def test_plot_roc(tmp_path):
    rng = np.random.default_rng(1)
    s_in = rng.normal(1, 1, 300)
    scores = {
        "gmm": {"in": s_in, "ood": {"mnist:test": rng.normal(0, 1, 200), "uniform": rng.normal(-3, 1, 100)}},
        "knn": {"in": s_in + rng.normal(0, 0.5, 300), "ood": {"mnist:test": rng.normal(0.5, 1, 200)}},
    }
    out = plot_roc(scores, tmp_path / "sub" / "roc.png")
    assert out == tmp_path / "sub" / "roc.png"
    _assert_png(out)


@pytest.mark.parametrize("spread", ["log", "linear"])
def test_plot_histograms(tmp_path, spread):
    rng = np.random.default_rng(2)
    scale_ood = 300.0 if spread == "log" else 1.3
    f_in = _features(rng, 200, 1.0) if spread == "log" else rng.uniform(1, 2, (200, len(SIGMAS)))
    f_ood = {"noise": _features(rng, 150, scale_ood), "const": np.full((20, len(SIGMAS)), 1.5)}
    out = plot_histograms(f_in, f_ood, SIGMAS, tmp_path / "hist.png")
    _assert_png(out)


def test_plot_histograms_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_histograms(np.ones((5, 4)), {"x": np.ones((5, 3))}, SIGMAS, tmp_path / "h.png")


def test_plot_embedding(tmp_path):
    rng = np.random.default_rng(3)
    train, f_in = _features(rng, 400, 1.0), _features(rng, 2500, 1.0)  # > 2000 to exercise subsampling
    out = plot_embedding(train, f_in, {"mnist:test": _features(rng, 300, 3.0)}, tmp_path / "emb.png")
    _assert_png(out)


def test_embed_2d_fitted_on_train_only():
    rng = np.random.default_rng(4)
    train, a, b = _features(rng, 300, 1.0), _features(rng, 50, 5.0), _features(rng, 80, 0.01)
    alone = embed_2d(train)
    with_a = embed_2d(train, a)
    with_ab = embed_2d(train, b, a)
    assert [z.shape for z in with_ab] == [(300, 2), (80, 2), (50, 2)]
    np.testing.assert_array_equal(alone[0], with_a[0])
    np.testing.assert_array_equal(alone[0], with_ab[0])
    np.testing.assert_array_equal(with_a[1], with_ab[2])
    # Same as log → standardise on train → PCA fitted on train, by hand.
    log_train = np.log(train)
    mean, std = log_train.mean(0), log_train.std(0)
    pca = PCA(2, svd_solver="full").fit((log_train - mean) / std)
    np.testing.assert_allclose(with_a[1], pca.transform((np.log(a) - mean) / std), atol=1e-10)


def test_embed_2d_rejects_bad_shapes():
    with pytest.raises(ValueError):
        embed_2d(np.ones((10, 1)))
    with pytest.raises(ValueError, match="shape"):
        embed_2d(_features(np.random.default_rng(5), 10, 1.0), np.ones((4, 2)))


def test_write_report(tmp_path, results):
    plots_dir = tmp_path / "plots"
    plots_dir.mkdir()
    (plots_dir / "roc.png").write_bytes(PNG_MAGIC)
    (tmp_path / "hist.png").write_bytes(PNG_MAGIC)
    rows = metrics_table(results)
    context = {"training set": "fashion-mnist:train", "model sha256": "ab|cd", "sigmas": SIGMAS,
               "train steps": 1000, "throughput": {"train img/s": 1234.5678}}
    plots = {"ROC": plots_dir / "roc.png", "histograms": str(tmp_path / "hist.png")}
    out = write_report(tmp_path, rows, plots, context)
    assert out == tmp_path / "report.md"
    text = out.read_text()
    assert text.startswith("# ")
    assert format_table(rows, "markdown") in text
    assert "![ROC](plots/roc.png)" in text and "![histograms](hist.png)" in text
    assert "| training set | fashion-mnist:train |" in text and "ab\\|cd" in text
    assert "1, 0.2154, 0.04642, 0.01" in text and "train img/s: 1234.6" in text
    assert "higher = more in-distribution" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
