"""Photographs end to end: a 32×32 RGB model trained from CIFAR-10's JPEG archive scores 64×64 Tiny ImageNet JPEGs
through `predict`, and a copied detector folder brings images to the model exactly as at fitting."""

import csv
import io
import json
import shutil
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import dgmood
from dgmood.app.cli import main
from dgmood.data.datasets import iter_chunks, load_images
from dgmood.data.images import ImagePolicy, decode


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, data_dir):
    """A tiny score model on 64 CIFAR-10 test JPEGs (32×32 RGB), its msma-knn detector fitted."""
    root = tmp_path_factory.mktemp("photos")
    run = root / "run"
    result = invoke("train", "--run", run, "--data", "cifar10:test[:64]", "--in", "cifar10:test[64:96]", "--steps", 3,
                    "--batch-size", 16, "--channels", "8,16", "--fit-n", 64, "--data-dir", data_dir, "--threads", 1,
                    "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("fit", "--run", run, "--method", "msma-knn", "--data-dir", data_dir, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    return root, run


def test_run_records_the_size_and_policy(photo_run):
    config = json.loads((photo_run[1] / "config.json").read_text())
    assert config["net"]["image_shape"] == [3, 32, 32] and config["resize"] == "crop"
    assert config["train"]["hflip"] is True  # colour photographs train mirrored at random by default
    saved = json.loads((photo_run[1] / "detectors" / "msma-knn" / "detector.json").read_text())
    assert saved["resize"] == "crop" and saved["image_shape"] == [3, 32, 32]


def test_grey_images_train_unmirrored_by_default(tmp_path, data_dir):
    result = invoke("train", "--run", tmp_path / "grey", "--data", "mnist[:64]", "--dry-run", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["train"]["hflip"] is False
    result = invoke("train", "--run", tmp_path / "grey", "--data", "mnist[:64]", "--hflip", "--dry-run",
                    "--data-dir", data_dir)
    assert json.loads(result.output)["train"]["hflip"] is True


def test_64px_jpegs_scored_by_a_32px_model_through_predict(photo_run, data_dir):
    root, run = photo_run
    out = root / "verdicts.csv"
    result = invoke("predict", "--run", run, "tiny-imagenet[:12]", "--method", "msma-knn", "--out", out,
                    "--data-dir", data_dir, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and rows[0]["source"] == "val/val_0.JPEG"
    assert {(r["height"], r["width"]) for r in rows} == {("64", "64")}
    # a copied detector folder scores the same decoded pixels identically: the policy travelled with it
    copy = shutil.copytree(run / "detectors" / "msma-knn", root / "elsewhere")
    det = dgmood.load(copy)
    assert det.resize == "crop" and det.image_shape == (3, 32, 32)
    x = load_images("tiny-imagenet[:12]", data_dir, shape=(3, 32, 32))
    np.testing.assert_allclose(det.score(x), [float(r["score"]) for r in rows], rtol=1e-5)
    # ... and it brings raw 64×64 uint8 pixels to the model by the same steps as a JPEG's decoded pixels
    raw = (load_images("tiny-imagenet[:12]", data_dir) * 255).round().astype(np.uint8)
    policy = ImagePolicy((3, 32, 32), "crop")
    as_png = []
    for image in raw:
        buf = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buf, "PNG")
        as_png.append(decode(buf.getvalue(), "x.png", policy)[0])
    np.testing.assert_allclose(det.score(raw), det.score(np.stack(as_png)), rtol=1e-6)


def test_predict_streams_an_archive_in_chunks(photo_run, tmp_path, data_dir):
    """A zip of mixed sizes and modes (grey, RGBA, 48×40) is streamed in chunks of 4 and scored like one pass."""
    root, run = photo_run
    x = (load_images("cifar10:test[100:110]", data_dir) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
        for i, image in enumerate(x):
            im = Image.fromarray(image)
            im = im.convert("L") if i == 3 else im.convert("RGBA") if i == 4 else im.resize((40, 48)) if i == 5 else im
            buf = io.BytesIO()
            im.save(buf, "PNG")
            zf.writestr(f"set/{i:02d}.png", buf.getvalue())
    shape = (3, 32, 32)
    chunks = list(iter_chunks(str(tmp_path / "mixed.zip"), shape, chunk=4))
    assert [len(c.images) for c in chunks] == [4, 4, 2] and chunks[1].sizes[1].tolist() == [48, 40]
    out = tmp_path / "v.csv"
    result = invoke("predict", "--run", run, tmp_path / "mixed.zip", "--method", "msma-knn", "--out", out,
                    "--data-dir", data_dir, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    scores = [float(r["score"]) for r in csv.DictReader(out.open())]
    det = dgmood.load(run, "msma-knn")
    np.testing.assert_allclose(scores, det.score(np.concatenate([c.images for c in chunks])), rtol=1e-5)


def test_64px_jpegs_scored_by_a_32px_model_through_serve(photo_run, data_dir):
    """The served app brings uploads to the model by the saved policy: a Tiny ImageNet JPEG as its raw bytes scores
    as `predict` scored it."""
    from starlette.testclient import TestClient

    from dgmood.app.serve import create_app
    from dgmood.data.datasets import open_collection

    root, run = photo_run
    det = dgmood.load(run, "msma-knn")
    collection = open_collection("tiny-imagenet", data_dir)
    (source, jpeg), = collection.read(3, 4)
    expected = det.score(load_images("tiny-imagenet[3:4]", data_dir, shape=(3, 32, 32)))[0]
    with TestClient(create_app(det)) as client:
        info = client.get("/info").json()
        answer = client.post("/score", content=jpeg)
    assert info["resize"] == "crop" and answer.status_code == 200, answer.text
    assert source.startswith("val/val_") and source.endswith(".JPEG")
    np.testing.assert_allclose(answer.json()["score"], expected, rtol=1e-5)
