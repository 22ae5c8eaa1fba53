"""The one detector object: every statistic's contract, every method's fit → save → load → identical scores,
and the user's commands on it (predict on a folder, a custom RGB folder with a held-out test split)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_run, write_pooled_sets
from PIL import Image

from dgmood.app.cli import main
from dgmood.app.runs import HELDOUT, FeatureConfig, Run
from dgmood.methods.image_detector import ImageDetector
from dgmood.methods.recipes import METHODS, build_detector
from dgmood.models.flow import FlowConfig
from dgmood.models.network import NetConfig
from dgmood.statistics.cache import StatisticCache
from dgmood.statistics.complexity import Complexity
from dgmood.statistics.feature_knn import FeatureKNN
from dgmood.statistics.field import PixelDeviation, ScoreFieldDeviation
from dgmood.statistics.flipd import FLIPD
from dgmood.statistics.knn import PixelKNN
from dgmood.statistics.likelihood import JacobianLID, LogLikelihood
from dgmood.statistics.orientation import Orientation
from dgmood.statistics.reconstruction import Reconstruction
from dgmood.statistics.score_norms import ScoreNorms

ROOT = Path(__file__).resolve().parents[1]
SMALL_LPCA = {"lpca_queries": 20, "lpca_neighbors": 50, "calibration_n": 20}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, data_dir):
    return write_pooled_sets(tmp_path_factory.mktemp("detector-sets"), data_dir, {
        "train": ("fashion-mnist", 300), "in": ("fashion-mnist:test", 40), "mnist": ("mnist:test", 40)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, sets):
    root = tmp_path_factory.mktemp("detector-runs")
    score = make_tiny_run(root / "score", data_dir, sets, NetConfig(image_shape=(1, 8, 8), channels=(8, 16)), 60,
                          features=FeatureConfig(fit_n=200))
    flow = make_tiny_run(root / "flow", data_dir, sets, FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=8, bins=4),
                         4, features=FeatureConfig(fit_n=200))
    return {"score": score, "flow": flow}


@pytest.fixture(scope="module")
def images(runs, sets):
    run = runs["score"]
    return {"train": run.images(str(sets["train"])), "in": run.images(str(sets["in"])),
            "mnist": run.images(str(sets["mnist"]))}


# --- every statistic -----------------------------------------------------------------------------------------

STATISTICS = {
    "score_norms": ("score", lambda: ScoreNorms((1.0, 0.1, 0.01)), True),
    "complexity": ("score", Complexity, True),
    "flipd": ("score", lambda: FLIPD(**SMALL_LPCA), True),
    "flipd-difference": ("score", lambda: FLIPD(difference=0.01, **SMALL_LPCA), True),
    "reconstruction": ("score", lambda: Reconstruction((0.1, 0.3), steps=2), True),
    "knn": ("score", PixelKNN, True),
    # per-pixel logs of small norms carry the network's float32 batch-to-batch rounding (~1e-5 relative)
    "field": ("score", lambda: ScoreFieldDeviation((1.0, 0.1, 0.01), max_fit=100), False),
    "pixels": ("score", PixelDeviation, True),
    "fknn": ("score", lambda: FeatureKNN(dims=8, max_bank=300), True),
    "orientation": ("score", lambda: Orientation(max_bank=300), True),
    "log_likelihood-flow": ("flow", lambda: LogLikelihood("flow"), True),
    "jacobian_lid": ("flow", lambda: JacobianLID(**SMALL_LPCA), True),
    "log_likelihood-diffusion": ("score", lambda: LogLikelihood("diffusion", solver="euler", probes=1), False),
}
"""name → (model kind, factory, values independent of the batch an image is in)."""


@pytest.mark.parametrize("name", STATISTICS)
def test_statistic_contract(name, runs, images, tmp_path):
    kind, make, batch_independent = STATISTICS[name]
    run, x = runs[kind], images["in"]
    stat = make().fit(run.model, images["train"])
    values = stat.compute(run.model, x)
    assert values.dtype == np.float64 and len(values) == len(x) and np.isfinite(values).all()
    width = 1 if values.ndim == 1 else values.shape[1]
    assert len(stat.columns(width)) == width
    np.testing.assert_array_equal(stat.compute(run.model, x), values)  # deterministic
    if batch_independent:  # an image's value does not depend on its batch or place in it
        np.testing.assert_allclose(stat.compute(run.model, x[[5, 3]]), values[[5, 3]], rtol=1e-6, atol=1e-9)
    # cached: computed once, then read back (the compute function is not called again)
    cache = StatisticCache(tmp_path, run.model_sha)
    first = cache.values(stat, "in-set", lambda: x, run.model)
    stat.compute = stat.compute_training = lambda *a, **k: pytest.fail("recomputed a cached statistic")
    np.testing.assert_array_equal(cache.values(stat, "in-set", lambda: x, run.model), first)
    # the fitted state round-trips, and refitting on other training images changes what it learned
    fresh = make()
    if stat.fitted:
        scalars, arrays = stat.state()
        restored = make().set_state(scalars, arrays)
        assert restored.cache_settings() == stat.cache_settings()
        other = fresh.fit(run.model, images["mnist"])
        learned = [getattr(stat, "calibration_", {}).get("target_lpca"), stat.cache_settings()]
        assert [getattr(other, "calibration_", {}).get("target_lpca"), other.cache_settings()] != learned


def test_knn_leaves_each_training_image_out(images):
    stat = PixelKNN(k=1).fit(None, images["train"])
    own = stat.compute(None, images["train"][:10])  # each one is in the bank (8-bit rounding of pooled pixels)
    assert (own < 0.5 * 8 / 255).all()
    assert (stat.compute_training(None, images["train"][:10]) > own).all()  # its own copy skipped
    assert stat.bank_.dtype == np.uint8 and stat.bank_.shape == (300, 64)


# --- every method --------------------------------------------------------------------------------------------

CASES = [(m, kind) for m, r in METHODS.items() for kind in r.models]


@pytest.fixture(scope="module")
def fitted(runs, images, tmp_path_factory):
    """(method, model kind) → (folder of the saved detector, its scores of the in-distribution test images)."""
    root, out = tmp_path_factory.mktemp("saved"), {}
    for method, kind in CASES:
        det = build_detector(method, runs[kind].model, kind)
        for stat in det.statistics:
            for key, value in SMALL_LPCA.items():
                if hasattr(stat, key):
                    setattr(stat, key, value)
            if isinstance(stat, LogLikelihood) and stat.lens == "diffusion":
                stat.solver, stat.probes = "euler", 1
            if hasattr(det.estimator, "max_epochs"):
                det.estimator.set_params(max_epochs=5)
        det.fit(images["train"], fit_n=200)
        folder = det.save(root / f"{method}-{kind}")
        out[method, kind] = folder, det.score_samples(images["in"]), det
    return out


@pytest.mark.parametrize("method, kind", CASES)
def test_method_predict_agrees_with_its_threshold(fitted, images, method, kind):
    _, scores, det = fitted[method, kind]
    assert scores.shape == (len(images["in"]),) and np.isfinite(scores).all()
    np.testing.assert_array_equal(det.predict(images["in"]), np.where(scores >= det.threshold, 1, -1))
    assert 0.5 <= (det.predict(images["train"][:200]) == 1).mean() <= 1.0  # ~95 % of its own fit set accepted


def test_every_method_loads_in_a_fresh_process_with_identical_scores(fitted, images, tmp_path):
    np.save(tmp_path / "x.npy", images["in"])
    folders = {f"{m}-{k}": str(folder) for (m, k), (folder, _, _) in fitted.items()}
    # One thread as in this process (conftest): a different thread count reorders float sums.
    code = ("import json, sys, numpy as np, torch, dgmood\n"
            "torch.set_num_threads(1)\n"
            "folders = json.loads(sys.argv[1]); x = np.load(sys.argv[2])\n"
            "np.savez(sys.argv[3], **{k: dgmood.load(v).score(x) for k, v in folders.items()})\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(folders), str(tmp_path / "x.npy"), str(tmp_path / "s.npz")],
                   check=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    loaded = np.load(tmp_path / "s.npz")
    for (method, kind), (_, scores, _) in fitted.items():
        # Equal to float32 rounding: oneDNN may pick another convolution kernel for a partial batch in a process
        # whose earlier work differed (seen: 4e-6 on 8 of 40 scores after other tests ran first).
        np.testing.assert_allclose(loaded[f"{method}-{kind}"], scores, rtol=0, atol=1e-4,
                                   err_msg=f"{method} on a {kind} model")


def test_saved_folder_holds_json_and_safetensors_only(fitted):
    folder = fitted["combined", "score"][0]
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["detector.json", "estimator/arrays.safetensors", "estimator/detector.json", "model.safetensors",
                     "statistics.safetensors"]
    manifest = json.loads((folder / "detector.json").read_text())
    assert set(manifest["files"]) == set(names) - {"detector.json"}
    assert [s["class"] for s in manifest["statistics"]] == ["ScoreNorms", "Complexity", "FLIPD", "Reconstruction",
                                                            "FeatureKNN", "Orientation", "PixelKNN"]
    assert ImageDetector.load(folder).statistics[-1].bank_.dtype == np.uint8


def test_wrong_model_kind_is_a_clear_error(runs):
    with pytest.raises(ValueError, match="method combined needs a score model, not a flow model"):
        build_detector("combined", runs["flow"].model, "flow")
    with pytest.raises(ValueError, match="unknown method 'lpips'"):
        build_detector("lpips", runs["score"].model, "score")


# --- the user's commands -------------------------------------------------------------------------------------


def _png_folder(folder: Path, x: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(x):
        Image.fromarray(np.rint(image[0] * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def test_predict_a_folder_of_pngs(runs, images, tmp_path, data_dir):
    run = runs["score"]
    folder = _png_folder(tmp_path / "new", np.concatenate([images["in"][:6], images["mnist"][:6]]))
    out = tmp_path / "verdicts.csv"
    result = invoke("predict", "--run", run.directory, folder, "uniform[:4]", "--out", out, "--method", "pixel-knn",
                    "--data-dir", data_dir, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16 and rows[0]["source"] == "img00.png" and rows[-1]["source"] == "uniform[:4]#3"
    assert {"source", "set", "index", "score", "verdict", "threshold", "knn"} <= set(rows[0])
    det = Run(run.directory, data_dir=data_dir).image_detector("pixel-knn")
    for row in rows:
        assert int(row["verdict"]) == (1 if float(row["score"]) >= det.threshold else -1)
    flagged = sum(r["verdict"] == "-1" for r in rows)
    assert f"{flagged} of 16 images flagged out-of-distribution" in result.output
    assert all(r["verdict"] == "-1" for r in rows if r["set"] == "uniform[:4]")  # noise is far from any clothing


def test_predict_refuses_a_bad_file_and_writes_nothing(runs, images, tmp_path, data_dir):
    folder = _png_folder(tmp_path / "new", images["in"][:3])
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "verdicts.csv"
    result = CliRunner().invoke(main, ["predict", "--run", str(runs["score"].directory), str(folder), "--out", str(out),
                                       "--method", "pixel-knn", "--data-dir", str(data_dir), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        f"Error: {folder / 'broken.png'}: not an image Pillow can read (unknown or corrupt format); "
        "replace or remove it, or pass --skip-bad"]
    assert not out.exists() and not list(tmp_path.glob("*.csv*"))
    # --skip-bad: the others are scored, the bad file is listed with its reason in the CSV and on the terminal
    (folder / "empty.png").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"x")
    result = CliRunner().invoke(main, ["predict", "--run", str(runs["score"].directory), str(folder), "--out", str(out),
                                       "--method", "pixel-knn", "--data-dir", str(data_dir), "--quiet", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped broken.png: not an image Pillow can read" in result.output
    assert "skipped empty.png: the file is empty (0 bytes)" in result.output and "2 files skipped" in result.output
    assert "ignored 1 hidden file" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["source"] for r in rows] == ["broken.png", "empty.png", "img00.png", "img01.png", "img02.png"]
    assert [r["score"] == "" for r in rows] == [True, True, False, False, False]
    assert rows[0]["error"].startswith("not an image") and rows[2]["error"] == "" and rows[2]["height"] == str(images["in"].shape[2])


def test_custom_rgb_folder_holds_out_a_test_split_and_scores(tmp_path, data_dir, monkeypatch):
    import dgmood.data.datasets as datasets

    monkeypatch.setattr(datasets, "DEFAULT_N", 200)  # the default OOD sets by name, 200 images each (not 10,000)
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    base = rng.integers(60, 200, (40, 1, 1, 3))
    for i in range(40):  # 32×32 RGB: a colour with a bright square at a random place
        image = np.broadcast_to(base[i], (32, 32, 3)).astype(np.uint8).copy()
        r, c = rng.integers(0, 24, 2)
        image[r:r + 8, c:c + 8] = 250
        Image.fromarray(image).save(folder / f"p{i:02d}.png")
    run_dir = tmp_path / "run"
    result = invoke("run", "--run", run_dir, "--data", folder, "--steps", 3, "--batch-size", 8, "--channels", "8,16",
                    "--fit-n", 0, "--method", "msma-knn", "--baselines", "pixel-knn", "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["holdout"], config["in_test"], config["net"]["image_shape"]) == (0.1, HELDOUT, [3, 32, 32])
    run = Run(run_dir, progress=False)
    train, held = run.images(str(folder)), run.images(HELDOUT)
    assert (len(train), len(held)) == (36, 4)
    flat = lambda a: {bytes(np.ascontiguousarray(v)) for v in a}  # noqa: E731
    assert not flat(train) & flat(held)  # the held-out images are not trained on
    metrics = json.loads((run_dir / "msma-knn" / "metrics.json").read_text())
    assert set(metrics) == {"msma-knn", "pixel-knn"} and set(metrics["msma-knn"]) == {"uniform", "gaussian", "constant"}
