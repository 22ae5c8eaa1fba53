"""Online scoring over HTTP: ``dgmood serve --run RUN`` (stdlib ``http.server``, no extra dependency).

Endpoints:

- ``POST /score``: the body is one image or a batch, either raw (any Content-Type: a PNG or JPEG file, or a
  ``.npy`` array: one image (H, W), (H, W, C), (C, H, W), or N images (N, H, W), (N, H, W, C), (N, C, H, W);
  uint8 or float in [0, 1]) or a ``multipart/form-data`` form of one or more files (fields ``file``, or
  any parts with a filename)::

      curl --data-binary @img.png http://127.0.0.1:8765/score
      curl -F file=@a.png -F file=@b.png http://127.0.0.1:8765/score
      curl --data-binary @batch.npy http://127.0.0.1:8765/score

  200 → one image: ``{"score": float, "in_distribution": bool, "reasons": str, "threshold": float,
  "detector": str, "model_sha256": str}``; a batch of N: ``{"scores": [...], "in_distribution": [...],
  "reasons": [...], "n": N, "threshold", "detector", "model_sha256"}`` (score higher = more in-distribution;
  in_distribution is score >= threshold; a non-finite score is sent as null and counts as OOD; reasons names
  the statistics furthest from training, e.g. ``"knn +6.2σ; complexity -4.1σ"``, or is empty).
  ``detector`` is the method's name.
- ``GET /health`` → ``{"status": "ok"}``.

Errors are JSON ``{"error": "..."}``: 400 not a PNG/JPEG/.npy, corrupt, truncated or empty body;
411 no Content-Length (chunked uploads are refused); 413 body over ``--max-bytes`` (refused from
Content-Length before reading); 422 a readable image the model cannot take (wrong size or
channels, message naming the expected HxWxC; NaN/inf or out-of-range values; more than ``MAX_BATCH`` images);
404 unknown path; 405 wrong method (with ``Allow``); 408 body not received in time; 503 more than
``MAX_CONNECTIONS`` connections open. Network passes run one at a time under the detector's lock;
decoding and validation run in parallel in one thread per connection. SIGINT/SIGTERM stop
accepting, let requests in flight finish, then exit with status 0.
"""

from __future__ import annotations

import io
import json
import math
import signal
import sys
import threading
import time
import traceback
from email import policy
from email.errors import MessageError
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

from dgmood.data.datasets import PIL_MODES, DataError, check_model_shape

__all__ = ["MAX_CONNECTIONS", "ScoreServer", "UploadError", "decode_upload", "make_server", "serve"]

MAX_CONNECTIONS = 32
"""Connections handled at once; more are answered 503 straight away."""

MAX_BATCH = 1024
"""Most images in one request."""

READ_TIMEOUT = 15.0
"""Seconds a client may stay silent while sending its request, and at most twice that for the body."""

ROUTES = {"/score": "POST", "/health": "GET"}
_NPY_MAGIC = b"\x93NUMPY"
_DRAIN_FACTOR = 8  # an oversized body up to this × max_bytes is read and discarded so the client sees the 413


class UploadError(Exception):
    """A request the server refuses: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ----------------------------------------------------------------------------- decoding


def _multipart_files(body: bytes, content_type: str) -> list[bytes]:
    """The bytes of every ``file`` field (else every part with a filename) of a multipart form, in order."""
    try:
        head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
        message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
        parts = list(message.iter_parts()) if message.is_multipart() else []
        chosen = [p for p in parts if p.get_param("name", header="content-disposition") == "file"]
        chosen = chosen or [p for p in parts if p.get_filename()]
        payloads = [p.get_payload(decode=True) for p in chosen]
    except (ValueError, TypeError, LookupError, UnicodeError, MessageError) as err:
        raise UploadError(400, f"malformed multipart form ({err}); send -F file=@image.png or the raw file") from None
    if not payloads or not all(isinstance(b, bytes) for b in payloads):
        raise UploadError(400, "the multipart form has no file field; send the image as -F file=@image.png")
    return payloads


def _decode_npy(body: bytes) -> np.ndarray:
    """The array of a ``.npy`` body, its header checked against the body size before anything is allocated."""
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise UploadError(400, f"the .npy upload is corrupt ({err}); save the image with numpy.save") from None
    if dtype.hasobject:
        raise UploadError(400, "the .npy upload holds Python objects; send a numeric array (uint8 or float)")
    expected, found = math.prod(shape) * dtype.itemsize, len(body) - f.tell()
    if expected != found:
        raise UploadError(400, f"the .npy upload is truncated or corrupt: its header says {shape} {dtype} = "
                               f"{expected} bytes of data but it has {found}; save it again with numpy.save")
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as err:
        raise UploadError(400, f"the .npy upload cannot be read ({err}); save it with numpy.save") from None


def _decode_image(body: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 from a PNG/JPEG body; size and channels checked from the header first."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(body), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError as err:
        raise UploadError(413, f"the image is too large once decoded ({err})") from None
    except (OSError, SyntaxError, ValueError, TypeError):
        raise UploadError(400, "the upload is not a PNG or JPEG image or a .npy array; send one image file") from None
    with im:
        mode = PIL_MODES.get(im.mode)
        if mode is None:
            raise UploadError(422, f"the image has mode {im.mode}; save it as 8-bit greyscale (L) or RGB")
        width, height = im.size
        try:  # header only: nothing of the wrong size is decoded
            check_model_shape(np.broadcast_to(np.uint8(0), (1, 1 if mode == "L" else 3, height, width)), shape,
                               "upload")
        except DataError as err:
            raise UploadError(422, str(err)) from None
        try:
            im.load()
            return np.asarray(im if im.mode == mode else im.convert(mode))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise UploadError(400, f"the image is truncated or corrupt ({err}); send it again") from None


def _decode_one(body: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """One uploaded file as an array of images (N, ...); N > 1 only for an .npy batch."""
    if not body:
        raise UploadError(400, "empty upload; send one PNG/JPEG image or .npy array as the body")
    if not body.startswith(_NPY_MAGIC):
        return _decode_image(body, shape)[None]
    arr = _decode_npy(body)
    if arr.ndim == 3 and arr.shape[0] not in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr[:, None]  # (N, H, W): N grey images
    elif arr.ndim in (2, 3):  # (H, W), (H, W, C) or (C, H, W): one image
        arr = arr[None]
    return arr


def decode_upload(body: bytes, content_type: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The images of a request body, as one array for :meth:`ImageDetector.score_samples`.

    Args:
        body: the request body (raw file, or a multipart form of one or more files when ``content_type`` says so).
        content_type: the request's Content-Type header ('' when absent).
        shape: the model's (C, H, W).

    Returns:
        (N, H, W), (N, H, W, C) or (N, C, H, W) array, uint8 or float; not yet validated for values.

    Raises:
        UploadError: 400 (not an image, corrupt) or 422 (wrong size, channels, mode or count).
    """
    files = _multipart_files(body, content_type) if content_type.lower().startswith("multipart/form-data") else [body]
    arrays = [_decode_one(f, shape) for f in files]
    if len(arrays) > 1 and len({a.shape[1:] for a in arrays} | {a.dtype.kind for a in arrays}) > 2:
        raise UploadError(422, "the uploaded files differ in size, channels or type; send images of one kind")
    images = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if len(images) > MAX_BATCH:
        raise UploadError(422, f"the upload holds {len(images)} images; send at most {MAX_BATCH} per request")
    if len(images) == 0:
        raise UploadError(422, "the upload holds no image; send at least one")
    return images


# ----------------------------------------------------------------------------- HTTP


class ScoreHandler(BaseHTTPRequestHandler):
    """Routes ``POST /score`` and ``GET /health``; every other request gets a JSON 4xx."""

    server_version = "dgmood-serve"
    default_request_version = "HTTP/1.0"  # answers to malformed request lines get a status line too
    timeout = READ_TIMEOUT  # socket timeout while reading the request

    def version_string(self) -> str:
        return self.server_version

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any other method (PUT, DELETE, FOO, ...) → 404/405, not 501
            return self._dispatch
        raise AttributeError(name)

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self):
        self._body_read = False
        try:
            self._route()
        finally:
            if self.close_connection:
                self._drain()

    def _route(self):
        path = urlsplit(self.path).path
        allowed = ROUTES.get(path)
        if allowed is None:
            self.close_connection = True
            return self._send_json(404, {"error": f"no endpoint {path}; use POST /score or GET /health"})
        method = "GET" if self.command == "HEAD" and allowed == "GET" else self.command
        if method != allowed:
            self.close_connection = True
            return self._send_json(405, {"error": f"{self.command} is not allowed on {path}; use {allowed}"},
                                   {"Allow": allowed})
        if path == "/health":
            return self._send_json(200, {"status": "ok"})
        try:
            self._send_json(200, self._score())
        except UploadError as err:
            self.close_connection = True
            self._send_json(err.status, {"error": err.message})
        except Exception:  # a bug, not bad input: log it, answer 500, keep serving
            self.close_connection = True
            traceback.print_exc()
            self._send_json(500, {"error": "internal error while scoring; see the server log"})

    def _content_length(self) -> int:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise UploadError(411, "chunked uploads are not supported; send the file with a Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            raise UploadError(411, "missing Content-Length; send the image file as the request body")
        try:
            length = int(text)
        except ValueError:
            length = -1
        if length < 0:
            raise UploadError(400, f"bad Content-Length {text[:40]!r}; send the body's size in bytes")
        if length > self.server.max_bytes:
            raise UploadError(413, f"the upload is {length} bytes; the limit is {self.server.max_bytes} "
                                   "(--max-bytes)")
        return length

    def _read_body(self, length: int) -> bytes:
        chunks, left, deadline = [], length, time.monotonic() + 2 * READ_TIMEOUT
        try:
            while left > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    raise UploadError(400, f"the body ended after {length - left} of {length} bytes; send it again")
                chunks.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            self._body_read = True  # the client is silent: nothing to drain
            raise UploadError(408, f"the body did not arrive within {READ_TIMEOUT:.0f} s; send it again") from None
        self._body_read = True
        return b"".join(chunks)

    def _drain(self) -> None:
        """Read and drop an unread request body (at most 8 × max_bytes, 3 s) before the connection closes.

        Closing a socket with unread input resets the connection, and the client may then lose the
        error response it has not read yet; draining lets it read the 4xx.
        """
        headers = getattr(self, "headers", None)
        if self._body_read or headers is None:
            return
        try:
            left = int(headers.get("Content-Length") or 0)
        except ValueError:
            left = 0
        cap = _DRAIN_FACTOR * self.server.max_bytes
        left = cap if headers.get("Transfer-Encoding") else min(max(left, 0), cap)
        deadline = time.monotonic() + 3.0
        try:
            self.connection.settimeout(1.0)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _score(self) -> dict:
        det = self.server.detector
        body = self._read_body(self._content_length())
        images = decode_upload(body, self.headers.get("Content-Type") or "", det.image_shape)
        try:
            x = det.prepare(images, "upload")  # dgmood.data's rules: dtype, shape, size, NaN/inf, range
        except DataError as err:
            raise UploadError(422, str(err)) from None
        explained = det.explain(x, maps=False)  # one network pass at a time (the detector's lock)
        scores = [float(s) for s in explained.scores]
        ok = [math.isfinite(s) and s >= det.threshold for s in scores]
        sent = [s if math.isfinite(s) else None for s in scores]
        common = {"threshold": det.threshold, "detector": det.method, "model_sha256": det.model_sha256}
        if len(scores) == 1:
            return {"score": sent[0], "in_distribution": ok[0], "reasons": explained.reasons[0], **common}
        return {"scores": sent, "in_distribution": ok, "reasons": explained.reasons, "n": len(scores), **common}

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, headers too long, ...) as JSON too."""
        self.close_connection = True
        self._send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def log_message(self, format, *args):
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n")


class ScoreServer(ThreadingHTTPServer):
    """A threading HTTP server holding a :class:`~dgmood.methods.image_detector.ImageDetector`.

    One thread per connection, at most :data:`MAX_CONNECTIONS` at once; ``server_close`` waits for the
    requests in flight (each bounded by :data:`READ_TIMEOUT`).
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, address, detector, max_bytes: int = 2_000_000, log: bool = True):
        self.detector, self.max_bytes, self.log = detector, int(max_bytes), log
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, ScoreHandler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": f"busy: {MAX_CONNECTIONS} connections open; retry shortly"}).encode()
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # the client went away mid-response
            if self.log:
                sys.stderr.write(f"{client_address[0]} - connection error: {err}\n")
            return
        super().handle_error(request, client_address)


def make_server(detector, host: str = "127.0.0.1", port: int = 8765, max_bytes: int = 2_000_000,
                log: bool = True) -> ScoreServer:
    """A bound (not yet serving) :class:`ScoreServer`; ``port`` 0 picks a free port (``server.server_port``)."""
    return ScoreServer((host, port), detector, max_bytes, log)


def serve(run_dir, detector: str | None = None, host: str = "127.0.0.1", port: int = 8765,
          max_bytes: int = 2_000_000, device: str = "cpu", log: bool = True, echo=None) -> None:
    """Load the saved detector of ``run_dir`` (a run, or a detector folder) and serve it until SIGINT/SIGTERM
    (see the module docstring). ``detector``: the method's name (default: the run's)."""
    from dgmood.app.loading import load

    echo = echo or (lambda line: print(line, flush=True))
    det = load(run_dir, detector, device)
    c, h, w = det.image_shape
    det.score(np.zeros((1, c, h, w), np.float32))  # warm-up: the first request is not the slow one
    try:
        server = make_server(det, host, port, max_bytes, log)
    except OSError as err:  # address in use, permission denied, unknown host
        raise OSError(err.errno, f"cannot listen on {host}:{port} ({err.strerror or err}); "
                                 "pick another --port or --host") from err
    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if server.server_address[0] not in ("127.0.0.1", "::1", "localhost"):
            echo(f"warning: listening on {server.server_address[0]}, not loopback; the server has no "
                 "authentication or TLS, put it behind a proxy")
        echo(f"dgmood serve: http://{server.server_address[0]}:{server.server_port} "
             f"(detector {det.method}, threshold {det.threshold:.4g}, image {h}x{w}x{c}, "
             f"model {det.model_sha256[:12]}); POST /score, GET /health; Ctrl-C to stop")
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # waits for requests in flight
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    echo("dgmood serve: stopped")
