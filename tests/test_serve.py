"""Online scoring: dgmood.load on a run directory, and `dgmood serve` over loopback HTTP in a subprocess."""

import base64
import http.client
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from PIL import Image

import dgmood
from dgmood.data import datasets as datasets
from dgmood.models.checkpoint import CheckpointError
from dgmood.app.cli import main
from dgmood.data.datasets import DataError
from dgmood.app.runs import Run

ROOT = Path(__file__).resolve().parents[1]
IN_SPEC = "fashion-mnist:test[:100]"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("serve") / "tiny"
    args = ["run", "--run", run, "--data", "fashion-mnist[:300]", "--steps", 4, "--batch-size", 16, "--channels", "8,16",
            "--fit-n", 200,
            "--in", IN_SPEC, "--ood", "uniform[:50]", "--threads", 1, "--quiet",
            "--data-dir", data_dir]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def bundle(run_dir):
    return dgmood.load(run_dir)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory, data_dir):
    """Files to POST: name → bytes."""
    folder = tmp_path_factory.mktemp("uploads")
    x = datasets.read_idx(datasets.dataset_file("fashion-mnist", "test", data_dir=data_dir))[:2]

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    def npy(arr):
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    nan = x[0].astype(np.float32) / 255
    nan[3, 3] = np.nan
    files = {
        "good.png": png(x[0]), "good.npy": npy(x[0].astype(np.float32) / 255),
        "big.png": png(np.zeros((32, 32), np.uint8)),
        "rgb.png": png(np.zeros((28, 28, 3), np.uint8)), "nan.npy": npy(nan), "two.npy": npy(x),
        "many.npy": npy(np.zeros((1025, 8, 8), np.uint8)),  # under --max-bytes
        "text.txt": b"hello, not an image", "trunc.png": png(x[0])[:60], "bad.npy": b"\x93NUMPY\x01\x00garbage",
    }
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


# ----------------------------------------------------------------------------- dgmood.load


def test_import_dgmood_stays_light():
    code = "import sys, dgmood; assert callable(dgmood.load); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=60)


def test_load_scores_equal_the_runs_own_detector(run_dir, bundle, data_dir):
    run = Run(run_dir, data_dir=data_dir, progress=False)
    det = run.image_detector()  # the run's default method, as fitted by `dgmood run`
    assert (bundle.method, bundle.threshold, bundle.model_sha256) == ("combined", det.threshold, run.model_sha)
    assert bundle.image_shape == (1, 28, 28)
    for spec in [IN_SPEC, "uniform[:50]"]:
        images = run.images(spec)
        scores = bundle.score(images)
        assert scores.shape == (len(images),) and scores.dtype == np.float64
        np.testing.assert_allclose(scores, det.score_samples(lambda: images, spec), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(bundle.predict(images), np.where(scores >= det.threshold, 1, -1))
    # the same images as uint8 (N, H, W), uint8 (N, H, W, 1) and float (N, 1, H, W) score the same
    raw = datasets.read_idx(datasets.dataset_file("fashion-mnist", "test", data_dir=data_dir))[:20]
    ref = bundle.score(run.images("fashion-mnist:test[:20]"))
    for images in [raw, raw[..., None], raw[:, None].astype(np.float32) / 255]:
        np.testing.assert_allclose(bundle.score(images), ref, rtol=1e-6)
    assert set(np.unique(bundle.predict(raw))) <= {-1, 1}


def test_load_brings_other_sizes_and_colours_by_the_saved_policy(bundle):
    """The run's policy (crop) travels with the detector: a 32×32 image is cut to 28×28, RGB becomes grey; under
    ``error`` the other size is refused with the data module's message (colour is converted under every policy)."""
    rng = np.random.default_rng(0)
    big, rgb = rng.integers(0, 256, (2, 32, 32), np.uint8), rng.integers(0, 256, (2, 28, 28, 3), np.uint8)
    assert bundle.resize == "crop"
    np.testing.assert_allclose(bundle.score(big), bundle.score(bundle.prepare(big)))
    assert bundle.prepare(big).shape == (2, 1, 28, 28) and bundle.prepare(rgb).shape == (2, 1, 28, 28)
    bundle.resize = "error"
    try:
        with pytest.raises(DataError, match="images are 32x32x1 but the model expects 28x28x1"):
            bundle.score(big)
        assert bundle.prepare(rgb).shape == (2, 1, 28, 28)
    finally:
        bundle.resize = "crop"


@pytest.mark.parametrize("images, message", [
    (np.full((2, 28, 28), np.nan, np.float32), "contains NaN or inf"),
    (np.full((2, 28, 28), 1.5), "must lie in [0, 1]"),
    (np.zeros((2, 28, 28), np.int64), "has dtype int64"),
    (np.zeros((2, 28), np.uint8), "expected (N, H, W) or (N, H, W, C)"),
    (np.zeros((0, 28, 28), np.uint8), "is empty"),
])
def test_load_rejects_bad_images_with_the_data_modules_messages(bundle, images, message):
    with pytest.raises(DataError) as err:
        bundle.score(images)
    assert message in str(err.value)
    with pytest.raises(DataError):
        bundle.predict(images)


def test_load_bad_bundles(run_dir, bundle, tmp_path):
    with pytest.raises(CheckpointError, match="no fitted msma-gmm detector.*fitted: combined, msma-knn, pixel-knn"):
        dgmood.load(run_dir, "gmm")
    with pytest.raises(ValueError, match="unknown method 'lpips'"):
        dgmood.load(run_dir, "lpips")
    with pytest.raises(CheckpointError, match="not a dgmood run"):
        dgmood.load(tmp_path / "nothing")
    # the saved detector folder, copied anywhere, is complete on its own
    copy = tmp_path / "shipped"
    shutil.copytree(run_dir / "detectors" / "combined", copy)
    images = np.random.default_rng(0).random((3, 28, 28))
    np.testing.assert_array_equal(dgmood.load(copy).score(images), bundle.score(images))
    # damaged or swapped files are refused with one line saying what to do
    (copy / "statistics.safetensors").rename(copy / "moved")
    with pytest.raises(CheckpointError, match="statistics.safetensors is missing"):
        dgmood.load(copy)
    (copy / "moved").rename(copy / "statistics.safetensors")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        dgmood.load(copy)


# ----------------------------------------------------------------------------- dgmood serve


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """(base URL, process) of `dgmood serve` on a free loopback port; stopped in teardown."""
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dgmood", "serve", "--run", str(run_dir), "--port", "0",
                             "--threads", "1", "--max-bytes", "200000", "--quiet"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=ENV, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert "http://127.0.0.1:" in line, f"server did not start: {line!r}"
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        proc.stdout.close()
        log.close()


def request(url, method="GET", path="/health", body=None, headers=None):
    """(status, JSON body, headers) of one request over loopback (headers looked up case-insensitively)."""
    host_port = url.split("//")[1]
    conn = http.client.HTTPConnection(host_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null"), response.headers  # case-insensitive
    finally:
        conn.close()


def test_health_and_score_a_png(server, bundle, uploads):
    url, _ = server
    assert request(url)[:2] == (200, {"status": "ok"})
    status, answer, headers = request(url, "POST", "/score", (uploads / "good.png").read_bytes(),
                                      {"Content-Type": "image/png"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert set(answer) == {"score", "in_distribution", "reasons", "threshold", "detector", "model_sha256"}
    image = np.asarray(Image.open(uploads / "good.png"))[None]
    assert answer["score"] == pytest.approx(float(bundle.score(image)[0]), rel=1e-9, abs=1e-9)
    assert answer["in_distribution"] == (answer["score"] >= answer["threshold"])
    assert (answer["threshold"], answer["detector"], answer["model_sha256"]) == (
        bundle.threshold, "combined", bundle.model_sha256)
    # the same image as .npy and as a multipart form field
    status, npy_answer, _ = request(url, "POST", "/score", (uploads / "good.npy").read_bytes())
    assert status == 200 and npy_answer["score"] == pytest.approx(answer["score"], rel=1e-9)
    boundary = "dgmoodtestboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"good.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + (uploads / "good.png").read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    status, form_answer, _ = request(url, "POST", "/score", form,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and form_answer["score"] == answer["score"]


def test_score_a_batch_as_npy_and_as_several_files(server, bundle, uploads):
    url, _ = server
    two = np.load(uploads / "two.npy")
    status, answer, _ = request(url, "POST", "/score", (uploads / "two.npy").read_bytes())
    assert status == 200 and answer["n"] == 2 and set(answer) == {
        "scores", "in_distribution", "reasons", "n", "threshold", "detector", "model_sha256"}
    np.testing.assert_allclose(answer["scores"], bundle.score(two), rtol=1e-9)
    assert len(answer["reasons"]) == 2 and all(isinstance(r, str) for r in answer["reasons"])
    assert answer["in_distribution"] == [s >= answer["threshold"] for s in answer["scores"]]
    boundary = "dgmoodbatch"
    part = lambda name: (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"  # noqa: E731
                         f"Content-Type: image/png\r\n\r\n").encode() + (uploads / name).read_bytes() + b"\r\n"
    form = part("good.png") + part("good.png") + f"--{boundary}--\r\n".encode()
    status, answer, _ = request(url, "POST", "/score", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and answer["n"] == 2 and answer["scores"][0] == answer["scores"][1]


@pytest.mark.parametrize("method, path, upload, headers, status, message", [
    ("POST", "/score", "text.txt", {}, 400, "not a PNG or JPEG"),
    ("POST", "/score", "trunc.png", {}, 400, "truncated or corrupt"),
    ("POST", "/score", "bad.npy", {}, 400, ".npy upload is corrupt"),
    ("POST", "/score", b"", {}, 400, "empty upload"),
    ("POST", "/score", "nan.npy", {}, 422, "NaN or inf"),
    ("POST", "/score", "many.npy", {}, 422, "send at most 1024 per request"),
    ("POST", "/score", b"x" * 300_000, {}, 413, "the limit is 200000"),
    ("POST", "/score", b"x" * 10, {"Content-Length": "999999999"}, 413, "999999999 bytes"),
    ("POST", "/score", b"", {"Content-Type": "multipart/form-data; boundary=zz"}, 400, "no file field"),
    ("POST", "/nope", "good.png", {}, 404, "no endpoint /nope"),
    ("GET", "/score", None, {}, 405, "use POST"),
    ("PUT", "/score", "good.png", {}, 405, "PUT is not allowed"),
    ("DELETE", "/health", None, {}, 405, "use GET"),
])
def test_bad_requests_get_json_4xx(server, uploads, method, path, upload, headers, status, message):
    url, proc = server
    body = (uploads / upload).read_bytes() if isinstance(upload, str) else upload
    got, answer, reply_headers = request(url, method, path, body, headers)
    assert got == status and message in answer["error"], answer
    if status == 405:
        assert reply_headers["Allow"] in ("GET", "POST")
    assert proc.poll() is None


def test_other_sizes_and_modes_are_brought_by_the_detectors_policy(server, bundle, uploads):
    """A 32×32 grey PNG and a 28×28 RGB PNG are scored (the run's policy: crop, RGB → grey) exactly as
    ``dgmood.load(...).score`` scores their pixels; under the ``error`` policy the server refuses them (422)."""
    from dgmood.app.uploads import UploadError, decode_upload

    url, _ = server
    for name in ("big.png", "rgb.png"):
        status, answer, _ = request(url, "POST", "/score", (uploads / name).read_bytes())
        pixels = np.asarray(Image.open(uploads / name))[None]
        assert status == 200, answer
        np.testing.assert_allclose(answer["score"], bundle.score(pixels)[0], rtol=1e-5)
    with pytest.raises(UploadError) as err:
        decode_upload((uploads / "big.png").read_bytes(), "image/png", (1, 28, 28), "error")
    assert err.value.status == 422 and "resize policy is error" in err.value.message
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)) + \
        _png_chunk(b"IEND", b"")
    with pytest.raises(UploadError) as err:
        decode_upload(bomb, "image/png", (1, 28, 28), "crop")
    assert err.value.status == 413 and "decompression bomb" in err.value.message


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_missing_length_and_malformed_request_line(server):
    url, proc = server
    host, port = url.split("//")[1].split(":")

    for raw, status in [(b"POST /score HTTP/1.0\r\n\r\n", 411), (b"GARBAGE\r\n\r\n", 400),
                        (b"POST /score HTTP/1.0\r\nContent-Length: -5\r\n\r\n", 400),
                        (b"POST /score HTTP/1.0\r\nContent-Length: 50\r\n\r\nshort", 400)]:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # the short body ends here
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == str(status).encode(), reply
        assert "error" in json.loads(body)
    assert proc.poll() is None


def test_load_test_from_a_second_process(server, uploads):
    url, proc = server
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--url", url,
                             "--requests", "40", "--concurrency", "4", "--image", str(uploads / "good.png"),
                             "--timeout", "20", "--deadline", "60", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] == 40 and report["failed"] == 0 and report["requests_per_s"] > 0
    assert proc.poll() is None


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def verdict_pngs(tmp_path_factory, bundle, data_dir):
    """(in-distribution PNG, OOD PNG): the best-scoring of 20 training images and uniform noise."""
    folder = tmp_path_factory.mktemp("page")
    train = datasets.read_idx(datasets.dataset_file("fashion-mnist", "train", data_dir=data_dir))[:20]
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    best = train[int(np.argmax(bundle.score(train)))]
    assert bundle.predict(best[None])[0] == 1 and bundle.predict(noise[None])[0] == -1
    paths = folder / "in.png", folder / "ood.png"
    Image.fromarray(best).save(paths[0])
    Image.fromarray(noise).save(paths[1])
    return paths


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium); "
                                              ".ci/run installs it")
def test_the_page_scores_dropped_images_in_chromium(server, verdict_pngs):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) not installed")
    url, proc = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "blob:", "data:")) else 0)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('about').textContent.includes('combined')")
            page.set_input_files("#files", [str(verdict_pngs[0])])  # chosen ...
            page.evaluate("""([name, b64]) => {  // ... and dropped
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0)), dt = new DataTransfer();
                dt.items.add(new File([bytes], name, {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt}));
            }""", ["ood.png", base64.b64encode(verdict_pngs[1].read_bytes()).decode()])
            page.wait_for_selector("#results[data-done='2']", timeout=60_000)
            cards = page.eval_on_selector_all("#results .card", """cards => cards.map(c => ({
                name: c.querySelector('.name').textContent, state: c.dataset.state, verdict: c.dataset.verdict,
                score: c.querySelector('.score').textContent,
                maps: [...c.querySelectorAll('img.map')].map(i => i.complete && i.naturalWidth),
                uploads: [...c.querySelectorAll('img.upload')].map(i => i.complete && i.naturalWidth)}))""")
        finally:
            browser.close()
    verdicts = {c["name"]: c for c in cards}
    assert verdicts["in.png"]["verdict"] == "in-distribution" and verdicts["ood.png"]["verdict"] == "ood", cards
    for card in cards:
        assert card["state"] == "done" and card["score"].startswith("score ")
        assert card["maps"] == [28] and card["uploads"] == [28], card  # both pictures decoded and drawn
    assert outside == []  # no external assets
    assert proc.poll() is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_uvicorn_workers_serve_the_run_named_in_the_environment(run_dir, uploads, tmp_path):
    port = free_port()
    env = dict(ENV, DGMOOD_SERVE_RUN=str(run_dir), DGMOOD_SERVE_MAX_BYTES="100000")
    log = open(tmp_path / "uvicorn.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "dgmood.app.serve:app", "--workers", "2",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # both workers load the detector: up to a minute on two busy cores
            try:
                if request(url)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        status, answer, _ = request(url, "POST", "/score", (uploads / "good.png").read_bytes())
        assert status == 200 and answer["detector"] == "combined", answer
        assert request(url, "GET", "/info")[1]["max_bytes"] == 100_000
        assert request(url, "POST", "/score", b"x" * 100_001)[0] == 413
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log.seek(0)
        text = log.read()
        log.close()
    assert "Traceback" not in text, text


def test_the_app_without_a_run_says_what_to_set(monkeypatch):
    import dgmood.app.serve as serve_module

    monkeypatch.delenv("DGMOOD_SERVE_RUN", raising=False)
    monkeypatch.setattr(serve_module, "_APP", None)
    with pytest.raises(RuntimeError, match="set DGMOOD_SERVE_RUN"):
        serve_module.app


def test_sigint_stops_the_server_cleanly(server):
    """Last test of the module: it stops the shared server."""
    url, proc = server
    assert request(url)[0] == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert "stopped" in proc.stdout.read()


# ----------------------------------------------------------------------------- the ASGI app, in-process


@pytest.fixture(scope="module")
def app(bundle):
    from dgmood.app.serve import create_app

    return create_app(bundle, max_bytes=200_000, batch_size=32, batch_wait_ms=20)


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    with TestClient(app) as c:
        yield c


def test_info_docs_and_the_openapi_schema(client, bundle):
    info = client.get("/info").json()
    assert info == {"detector": "combined", "model_sha256": bundle.model_sha256, "image_size": [28, 28, 1],
                    "resize": "crop", "threshold": bundle.threshold, "max_bytes": 200_000, "max_images": 1024,
                    "batch_size": 32, "batch_wait_ms": 20.0, "max_queue": 64}
    schema = client.get("/openapi.json").json()
    score = schema["paths"]["/score"]["post"]
    assert {"image/png", "image/jpeg", "application/octet-stream", "multipart/form-data"} <= set(
        score["requestBody"]["content"])
    assert {"200", "400", "411", "413", "422", "503"} <= set(score["responses"])
    assert {"Score", "BatchScore", "ErrorBody", "Info"} <= set(schema["components"]["schemas"])
    assert set(schema["components"]["schemas"]["Score"]["properties"]) == {
        "score", "in_distribution", "reasons", "threshold", "detector", "model_sha256"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assets = [part.split('"')[0] for part in docs.text.split('="')[1:] if part.startswith("/docs/assets/")]
    assert len(assets) == 3 and "cdn" not in docs.text  # script, style and icon from this server, none from a CDN
    for asset in assets:
        assert client.get(asset).status_code == 200 and len(client.get(asset).content) > 500
    page = client.get("/")
    assert page.status_code == 200 and "http://" not in page.text and "https://" not in page.text


def test_concurrent_requests_share_a_pass_and_score_as_alone(app, bundle, verdict_pngs):
    import asyncio

    import httpx2

    bodies = [p.read_bytes() for p in verdict_pngs] * 6
    alone = [float(bundle.score(np.asarray(Image.open(p))[None])[0]) for p in verdict_pngs] * 6
    batcher = app.state.batcher

    async def main():
        before = batcher.batches
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as c:
            replies = await asyncio.gather(*(c.post("/score", content=b) for b in bodies))
        return replies, batcher.batches - before

    replies, batches = asyncio.run(main())
    assert [r.status_code for r in replies] == [200] * len(bodies)
    # the same scores up to float32 rounding of batched network passes (measured: 2e-6 relative)
    np.testing.assert_allclose([r.json()["score"] for r in replies], alone, rtol=1e-4)
    assert [r.json()["in_distribution"] for r in replies] == [True, False] * 6
    assert batches < len(bodies) / 2, batches  # 12 requests in a few passes


def test_explain_draws_each_map_over_its_image(client, verdict_pngs):
    answer = client.post("/explain", content=verdict_pngs[1].read_bytes()).json()
    assert answer["in_distribution"] is False and answer["map"].startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(answer["map"].split(",", 1)[1])))
    assert picture.size == (28, 28) and picture.mode == "RGB"
    two = np.stack([np.asarray(Image.open(p)) for p in verdict_pngs])
    buf = io.BytesIO()
    np.save(buf, two)
    batch = client.post("/explain", content=buf.getvalue()).json()
    assert batch["n"] == 2 and len(batch["maps"]) == 2 and batch["in_distribution"] == [True, False]


@pytest.mark.parametrize("content_type, body, message", [
    ("multipart/form-data", b"--zz\r\n\r\nx\r\n--zz--\r\n", "No boundary given"),
    ("multipart/form-data; boundary=zz", b"garbage", "malformed multipart form"),
    ("multipart/form-data; boundary=zz",
     b"--zz\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--zz--\r\n", "no file field"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\""
     b"\r\n\r\n\r\n--zz--\r\n", "empty upload"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nnot png"
     b"\r\n--zz--\r\n", "not a PNG or JPEG"),
])
def test_multipart_edge_cases_get_json_400(client, content_type, body, message):
    reply = client.post("/score", content=body, headers={"Content-Type": content_type})
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text


def test_chunked_bodies_are_capped_while_read(client, uploads):
    def chunks(blob, size=4096):
        yield from (blob[i:i + size] for i in range(0, len(blob), size))

    good = (uploads / "good.png").read_bytes()
    assert client.post("/score", content=chunks(good)).status_code == 200  # no Content-Length: chunked
    reply = client.post("/score", content=chunks(b"x" * 300_000))
    assert reply.status_code == 413 and "over 200000 bytes" in reply.json()["error"]


def test_a_body_that_does_not_arrive_in_time_gets_408(app, monkeypatch):
    import asyncio

    import httpx2

    import dgmood.app.serve as serve_module

    monkeypatch.setattr(serve_module, "BODY_TIMEOUT", 0.3)

    async def slow():
        yield b"\x89PNG"
        await asyncio.sleep(5)
        yield b"never"

    async def main():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/score", content=slow(), headers={"Content-Length": "100"})

    reply = asyncio.run(main())
    assert reply.status_code == 408 and "did not arrive within 0.3 s" in reply.json()["error"]


def test_a_full_queue_answers_503(bundle, uploads):
    from starlette.testclient import TestClient

    from dgmood.app.serve import create_app

    with TestClient(create_app(bundle, max_queue=0)) as c:
        reply = c.post("/score", content=(uploads / "good.png").read_bytes())
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1" and "busy" in reply.json()["error"]


def errors_are_json(ctx, response, case):
    """Every 4xx/5xx is JSON {"error": one line}."""
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json"), response.headers
        error = response.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error and "Traceback" not in error


def test_fuzzed_requests_get_no_5xx_and_json_errors(app):
    """schemathesis on the app's own OpenAPI schema, in-process: each operation, 25 generated requests (positive
    and negative), every default check (no 5xx, status codes, content types and bodies as documented) but
    positive_data_acceptance: a schema-valid body is any bytes, and a 1x1 PNG rightly gets 422."""
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} == {
        "POST /score", "POST /explain", "GET /health", "GET /info"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(additional_checks=[errors_are_json], excluded_checks=[positive_data_acceptance])

        fuzz()
