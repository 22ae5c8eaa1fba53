"""Online scoring over HTTP: an ASGI app (FastAPI) served by uvicorn, ``dgmood serve --run RUN``.

Endpoints:

- ``POST /score``: the body is one image or a batch, either raw (any Content-Type: a PNG or JPEG file, or a
  ``.npy`` array: one image (H, W), (H, W, C), (C, H, W), or N images (N, H, W), (N, H, W, C), (N, C, H, W);
  uint8 or float in [0, 1]) or a ``multipart/form-data`` form of one or more files (fields ``file``, or
  any parts with a filename)::

      curl --data-binary @img.png http://127.0.0.1:8765/score
      curl -F file=@a.png -F file=@b.png http://127.0.0.1:8765/score

  200 → one image: ``{"score", "in_distribution", "reasons", "threshold", "detector", "model_sha256"}``;
  a batch of N: ``{"scores": [...], "in_distribution": [...], "reasons": [...], "n", "threshold", "detector",
  "model_sha256"}`` (:mod:`dgmood.app.schemas`).
- ``POST /explain``: the same, plus each image's anomaly map drawn over it (``map`` / ``maps``: PNG data URIs);
  batched like ``/score`` but apart from it (maps cost more passes), with its own queue of ``max_queue``.
- ``GET /`` a page to drop images on; ``GET /health`` → ``{"status": "ok"}``; ``GET /info``; ``GET /docs`` and
  ``GET /openapi.json``.

Errors are JSON ``{"error": "..."}``: 400 not a PNG/JPEG/.npy, corrupt, truncated, empty or malformed;
411 no Content-Length and not chunked; 413 body over ``max_bytes`` (from Content-Length before reading, else
while reading); 408 body not received within :data:`BODY_TIMEOUT`; 422 a readable image the model cannot take;
404, 405 (with ``Allow``); 503 when ``max_queue`` requests are already admitted. Requests that arrive
together are scored in one network pass (:mod:`dgmood.app.batching`); decoding runs on a thread pool.

``create_app(detector)`` builds the app (tests drive it in-process); ``uvicorn dgmood.app.serve:app --workers N``
serves the detector folder or run named by ``DGMOOD_SERVE_RUN`` in each worker (and ``DGMOOD_SERVE_METHOD``,
``DGMOOD_SERVE_DEVICE``, ``DGMOOD_SERVE_MAX_BYTES``, ``DGMOOD_SERVE_BATCH_SIZE``, ``DGMOOD_SERVE_BATCH_WAIT_MS``,
``DGMOOD_SERVE_MAX_QUEUE``: the options of ``dgmood serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from dgmood.app.batching import Batcher, QueueFull
from dgmood.app.uploads import MAX_BATCH, UploadError, decode_upload
from dgmood.data.datasets import DataError

__all__ = ["BODY_TIMEOUT", "MAX_QUEUE", "UploadError", "create_app", "decode_upload", "resize_policy", "serve"]

MAX_QUEUE = 64
"""Default for the requests admitted at once (being received, decoded, queued or scored); more get 503. At most
this many bodies of up to ``max_bytes`` each are held in memory."""

BODY_TIMEOUT = 30.0
"""Seconds a client may take to send its whole body."""

ENDPOINTS = "POST /score, POST /explain, GET /health, GET /info, GET /docs or GET / (the page)"


def resize_policy(detector) -> str:
    """What the detector does with an image of another size ('error': refused with 422)."""
    return str(getattr(detector, "resize", "error"))


def info(detector, max_bytes: int, batcher: Batcher) -> dict:
    """``GET /info``: what is being served (:class:`dgmood.app.schemas.Info`)."""
    c, h, w = detector.image_shape
    return {"detector": detector.method, "model_sha256": detector.model_sha256, "image_size": [h, w, c],
            "resize": resize_policy(detector), "threshold": detector.threshold, "max_bytes": max_bytes,
            "max_images": MAX_BATCH, "batch_size": batcher.max_batch, "batch_wait_ms": batcher.max_wait_ms,
            "max_queue": batcher.max_queue}


# ----------------------------------------------------------------------------- answers


def verdicts(detector, x: np.ndarray, maps: bool = False) -> list[dict]:
    """Per image of ``x`` (N, C, H, W): score (None when not finite), in_distribution, reasons (and map)."""
    e = detector.explain(x, maps=maps)
    out = []
    for i, s in enumerate(float(s) for s in e.scores):
        finite = math.isfinite(s)
        out.append({"score": s if finite else None, "in_distribution": finite and s >= detector.threshold,
                    "reasons": e.reasons[i]})
        if maps:
            out[-1]["map"] = None if e.maps is None else _map_uri(detector, x[i], e.maps[i])
    return out


def _map_uri(detector, image: np.ndarray, amap: np.ndarray) -> str:
    from PIL import Image

    from dgmood.evaluation.tiles import overlay, png_bytes, png_data_uri
    from dgmood.methods.explain import map_scale

    return png_data_uri(png_bytes(Image.fromarray(overlay(image, amap, map_scale(detector)))))


def answer(detector, results: list[dict]) -> dict:
    """The JSON of ``POST /score`` (and ``/explain``) from per-image :func:`verdicts`."""
    common = {"threshold": detector.threshold, "detector": detector.method, "model_sha256": detector.model_sha256}
    if len(results) == 1:
        return {**results[0], **common}
    out = {"scores": [r["score"] for r in results], "in_distribution": [r["in_distribution"] for r in results],
           "reasons": [r["reasons"] for r in results], "n": len(results), **common}
    if "map" in results[0]:
        out["maps"] = [r["map"] for r in results]
    return out


def prepared(detector, body: bytes, content_type: str) -> np.ndarray:
    """The request's images validated for the model: float32 (N, C, H, W) in [0, 1]; raises :class:`UploadError`."""
    images = decode_upload(body, content_type, detector.image_shape, resize_policy(detector))
    try:
        return detector.prepare(images, "upload")  # dgmood.data's rules: dtype, shape, size, NaN/inf, range
    except DataError as err:
        raise UploadError(422, str(err)) from None


# ----------------------------------------------------------------------------- the request body


def declared_length(headers, max_bytes: int) -> int | None:
    """The body size the headers announce (None for a chunked body); refuses what is too big before reading."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None
    text = headers.get("content-length")
    if text is None:
        raise UploadError(411, "missing Content-Length; send the image file as the request body")
    length = int(text) if text.isdigit() else -1
    if length < 0:
        raise UploadError(400, f"bad Content-Length {text[:40]!r}; send the body's size in bytes")
    if length > max_bytes:
        raise UploadError(413, f"the upload is {length} bytes; the limit is {max_bytes} (--max-bytes)")
    return length


async def read_body(request, max_bytes: int) -> bytes:
    """The whole body, at most ``max_bytes`` and :data:`BODY_TIMEOUT` seconds (413, 408, 400 if it breaks off)."""
    from starlette.requests import ClientDisconnect

    length, chunks, size = declared_length(request.headers, max_bytes), [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise UploadError(413, f"the upload is over {max_bytes} bytes, the limit (--max-bytes)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), BODY_TIMEOUT)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise UploadError(408, f"the body did not arrive within {BODY_TIMEOUT:g} s; send it again") from None
    except ClientDisconnect:
        raise UploadError(400, f"the connection closed after {size} bytes of the body; send it again") from None
    if length is not None and size != length:
        raise UploadError(400, f"the body ended after {size} of {length} bytes; send it again")
    return b"".join(chunks)


# ----------------------------------------------------------------------------- the app


def create_app(detector, max_bytes: int = 2_000_000, batch_size: int = 32, batch_wait_ms: float = 5.0,
               max_queue: int = MAX_QUEUE):
    """The ASGI app serving ``detector`` (a fitted :class:`~dgmood.methods.image_detector.ImageDetector`).

    Args:
        detector: What scores the images.
        max_bytes: Largest request body accepted (413 above).
        batch_size: Most images scored together in one network pass.
        batch_wait_ms: Longest wait, in milliseconds, for more requests to join a batch.
        max_queue: Requests admitted at once; more get 503.
    """
    batcher = Batcher(lambda x: verdicts(detector, x), batch_size, batch_wait_ms, max_queue)
    explainer = Batcher(lambda x: verdicts(detector, x, maps=True), batch_size, batch_wait_ms, max_queue)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # a client's malformed form is not our warning

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        explainer.close()

    app = FastAPI(title="dgmood serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Out-of-distribution scores of images from a fitted dgmood detector. Scores are "
                              "higher = more in-distribution; errors are JSON {\"error\": \"...\"}.")
    app.state.detector, app.state.batcher, app.state.explainer = detector, batcher, explainer
    _add_error_handlers(app)
    _add_routes(app, detector, batcher, explainer, max_bytes)
    _add_docs(app)
    return app


def _add_routes(app, detector, batcher: Batcher, explainer: Batcher, max_bytes: int) -> None:
    """``POST /score`` (batched by ``batcher``), ``POST /explain`` (batched by ``explainer``), ``GET /health``,
    ``GET /info`` and the page at ``GET /``."""
    from dgmood.app import schemas

    errors = {code: {"model": schemas.ErrorBody, "description": text} for code, text in [
        (400, "Not a PNG, JPEG or .npy file; corrupt, truncated, empty or malformed."),
        (408, "The body did not arrive in time."), (411, "No Content-Length (and not chunked)."),
        (413, "The body is over the size limit."), (422, "An image the model cannot take (size, channels, values)."),
        (503, "The queue is full; retry shortly.")]}
    upload = {"requestBody": schemas.body_schema()}
    page_html = resources.files("dgmood.app").joinpath("page.html").read_text(encoding="utf-8")

    async def images_of(request: Request) -> np.ndarray:
        body = await read_body(request, max_bytes)
        return await asyncio.to_thread(prepared, detector, body, request.headers.get("content-type", ""))

    @app.post("/score", response_model=schemas.Score | schemas.BatchScore, responses=errors, openapi_extra=upload,
              summary="Score one image or a batch")
    async def score(request: Request):
        with batcher.admit() as submit:
            return _json(200, answer(detector, await submit(await images_of(request))))

    @app.post("/explain", response_model=schemas.Explanation | schemas.BatchExplanation, responses=errors,
              openapi_extra=upload, summary="Score images and draw their anomaly maps")
    async def explain(request: Request):
        with explainer.admit() as submit:
            return _json(200, answer(detector, await submit(await images_of(request))))

    @app.get("/health", response_model=schemas.Health, summary="Liveness probe")
    async def health():
        return {"status": "ok"}

    @app.get("/info", response_model=schemas.Info, summary="What is being served")
    async def about():
        return info(detector, max_bytes, batcher)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html)


def _json(status: int, obj: dict, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(obj, allow_nan=False), status, headers, media_type="application/json")


def _add_error_handlers(app) -> None:
    """Every refusal as JSON ``{"error": ...}``, never a traceback."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(UploadError)
    async def upload_error(request, err: UploadError):
        return _json(err.status, {"error": err.message})

    @app.exception_handler(QueueFull)
    async def queue_full(request, err: QueueFull):
        return _json(503, {"error": str(err)}, {"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        path, headers = request.url.path, dict(err.headers or {})
        if err.status_code == 404:
            return _json(404, {"error": f"no endpoint {path}; use {ENDPOINTS}"})
        if err.status_code == 405:
            allowed = headers.get("Allow", "").replace(", HEAD", "")
            return _json(405, {"error": f"{request.method} is not allowed on {path}; use {allowed}"}, headers)
        return _json(err.status_code, {"error": str(err.detail)}, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        return _json(422, {"error": f"invalid request: {first.get('msg', err)} at {first.get('loc', '?')}"})

    @app.exception_handler(Exception)
    async def bug(request, err: Exception):  # logged by the server; the client gets one line
        logging.getLogger("dgmood.serve").exception("error while answering %s %s", request.method, request.url.path)
        return _json(500, {"error": "internal error while scoring; see the server log"})


def _add_docs(app) -> None:
    """``GET /docs``: Swagger UI (version 5: it renders FastAPI's OpenAPI 3.1) over ``/openapi.json``, its script
    and style served from the ``fastapi-offline`` package's copy under ``/docs/assets`` (no CDN: the page works on
    a closed network)."""
    from importlib import resources

    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    assets = resources.files("fastapi_offline") / "static"
    app.mount("/docs/assets", StaticFiles(directory=str(assets)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="dgmood serve: API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dgmood")
    except PackageNotFoundError:
        return "0"


# ----------------------------------------------------------------------------- running it


def _detector_from_env():
    from dgmood.app.loading import load

    run = os.environ.get("DGMOOD_SERVE_RUN")
    if not run:
        raise RuntimeError("set DGMOOD_SERVE_RUN to a fitted run or detector folder to serve dgmood.app.serve:app")
    return warm(load(run, os.environ.get("DGMOOD_SERVE_METHOD") or None, os.environ.get("DGMOOD_SERVE_DEVICE", "cpu")))


def warm(detector):
    """``detector`` after one pass on a blank image, so the first request is not the slow one."""
    c, h, w = detector.image_shape
    detector.score(np.zeros((1, c, h, w), np.float32))
    return detector


_APP = None


def __getattr__(name: str):
    """``dgmood.app.serve:app`` for ``uvicorn --workers N``: the app of ``$DGMOOD_SERVE_RUN``, built on first use."""
    global _APP
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _APP is None:
        env = os.environ.get
        _APP = create_app(_detector_from_env(), int(env("DGMOOD_SERVE_MAX_BYTES", 2_000_000)),
                          int(env("DGMOOD_SERVE_BATCH_SIZE", 32)), float(env("DGMOOD_SERVE_BATCH_WAIT_MS", 5.0)),
                          int(env("DGMOOD_SERVE_MAX_QUEUE", MAX_QUEUE)))
    return _APP


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ``port`` 0 picks a free one. Raises OSError with a one-line message."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except (OSError, OverflowError) as err:  # address in use, permission denied, unknown host
        sock.close()
        raise OSError(getattr(err, "errno", None), f"cannot listen on {host}:{port} "
                      f"({getattr(err, 'strerror', None) or err}); pick another --port or --host") from err
    return sock


def _json_400_protocol():
    """uvicorn's h11 protocol, answering malformed HTTP (bad request line, bad Content-Length) with JSON too."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"malformed HTTP request ({msg.rstrip('.')}); check the request line "
                                        "and headers"}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def eof_received(self) -> bool | None:
            """A client that stops sending (shutdown(SHUT_WR)) still gets its answer: a short body ends where
            it stopped (400), then the connection closes."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return None
            cycle.keep_alive = False
            if self.conn.their_state is h11.SEND_BODY:
                cycle.more_body = False
                cycle.message_event.set()
            return True

    return JsonErrorsH11


def serve(run_dir, detector: str | None = None, host: str = "127.0.0.1", port: int = 8765,
          max_bytes: int = 2_000_000, device: str = "cpu", log: bool = True, echo=None, batch_size: int = 32,
          batch_wait_ms: float = 5.0, max_queue: int = MAX_QUEUE) -> None:
    """Load the saved detector of ``run_dir`` (a run, or a detector folder) and serve it with uvicorn until
    SIGINT/SIGTERM, which stop accepting, let requests in flight finish, then return.
    ``detector``: the method's name (default: the run's); the other arguments as :func:`create_app`'s."""
    import uvicorn

    from dgmood.app.loading import load

    echo = echo or (lambda line: print(line, flush=True))
    det = warm(load(run_dir, detector, device))
    sock = _listen(host, port)
    app = create_app(det, max_bytes, batch_size, batch_wait_ms, max_queue)
    config = uvicorn.Config(app, http=_json_400_protocol(), lifespan="on", log_level="info" if log else "warning",
                            access_log=log, timeout_graceful_shutdown=2 * BODY_TIMEOUT, server_header=False)
    address, bound = sock.getsockname()[:2]
    if address not in ("127.0.0.1", "::1"):
        echo(f"warning: listening on {address}, not loopback; the server has no authentication or TLS, "
             "put it behind a proxy")
    c, h, w = det.image_shape
    echo(f"dgmood serve: http://{f'[{address}]' if ':' in address else address}:{bound} (detector {det.method}, threshold {det.threshold:.4g}, "
         f"image {h}x{w}x{c}, model {det.model_sha256[:12]}, batches of up to {batch_size} within "
         f"{batch_wait_ms:g} ms); POST /score, GET /health, GET / for the page; Ctrl-C to stop")
    main = threading.current_thread() is threading.main_thread()
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:  # uvicorn re-raises the signal that stopped it once done: these no-op handlers take it
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        sock.close()
    echo("dgmood serve: stopped")
