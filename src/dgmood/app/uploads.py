"""Uploads to ``dgmood serve`` as image arrays: one raw file (PNG, JPEG or ``.npy``) or a multipart form of files.

Everything a request body goes through before the detector sees it lives here, behind one function,
:func:`decode_upload` (the app and the batching never look inside a body), so the decoding rules can change in
one place. Refusals are :class:`UploadError`: an HTTP status and a one-line message for the client.
"""

from __future__ import annotations

import io
import math

import numpy as np

from dgmood.data.images import BadImage, ImagePolicy, decode

__all__ = ["MAX_BATCH", "UploadError", "decode_upload"]

MAX_BATCH = 1024
"""Most images in one request."""

_NPY_MAGIC = b"\x93NUMPY"


class UploadError(Exception):
    """A request the server refuses: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _multipart_files(body: bytes, content_type: str) -> list[bytes]:
    """The bytes of every ``file`` field (else every part with a filename) of a multipart form, in order
    (parsed by python-multipart, the parser Starlette uses)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import create_form_parser

    parts: list[tuple[bytes | None, bool, bytes]] = []  # (field name, has a filename, content)
    on_field = lambda f: parts.append((f.field_name, False, f.value or b""))  # noqa: E731
    on_file = lambda f: parts.append((f.field_name, bool(f.file_name), f.file_object.getvalue()))  # noqa: E731
    try:
        parser = create_form_parser({"Content-Type": content_type.encode("latin-1")}, on_field, on_file,
                                    config={"MAX_MEMORY_FILE_SIZE": math.inf, "UPLOAD_KEEP_FILENAME": False})
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError, UnicodeError) as err:
        raise UploadError(400, f"malformed multipart form ({err}); send -F file=@image.png or the raw file") from None
    chosen = [content for name, _, content in parts if name == b"file"] or [c for _, named, c in parts if named]
    if not chosen:
        raise UploadError(400, "the multipart form has no file field; send the image as -F file=@image.png")
    return chosen


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


_STATUS = {"too-large": 413, "size": 422}
"""HTTP status of a :class:`~dgmood.data.images.BadImage` by its kind; every other kind is 400."""


def _decode_image(body: bytes, shape: tuple[int, int, int], resize: str) -> np.ndarray:
    """(C, H, W) uint8 of the model's shape from an image body, by the detector's policy (:mod:`dgmood.data.images`:
    orientation, mode, then size; a bomb is refused from its header, before any pixel is decoded)."""
    try:
        return decode(body, "the upload", ImagePolicy(shape, resize))[0]
    except BadImage as err:
        raise UploadError(_STATUS.get(err.kind, 400), _message(err)) from None


def _message(err: BadImage) -> str:
    """The client's one line for an image that cannot be used."""
    if err.kind == "unknown":
        return "the upload is not a PNG or JPEG image (or another image format) or a .npy array; send one image file"
    if err.kind == "size":
        return f"{err.reason}: this detector's resize policy is error; send it at the model's size"
    return f"the image cannot be decoded: {err.reason}; send it again" if err.kind == "corrupt" else err.reason


def _decode_one(body: bytes, shape: tuple[int, int, int], resize: str) -> np.ndarray:
    """One uploaded file as an array of images (N, ...); N > 1 only for an .npy batch."""
    if not body:
        raise UploadError(400, "empty upload; send one PNG/JPEG image or .npy array as the body")
    if not body.startswith(_NPY_MAGIC):
        return _decode_image(body, shape, resize)[None]
    arr = _decode_npy(body)
    if arr.ndim == 3 and arr.shape[0] not in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr[:, None]  # (N, H, W): N grey images
    elif arr.ndim in (2, 3):  # (H, W), (H, W, C) or (C, H, W): one image
        arr = arr[None]
    return arr


def decode_upload(body: bytes, content_type: str, shape: tuple[int, int, int], resize: str = "error") -> np.ndarray:
    """The images of a request body, as one array for :meth:`ImageDetector.score_samples`.

    Args:
        body: the request body (raw file, or a multipart form of one or more files when ``content_type`` says so).
        content_type: the request's Content-Type header ('' when absent).
        shape: the model's (C, H, W).
        resize: the detector's resize policy: every image file is brought to ``shape`` by it
            (:mod:`dgmood.data.images`); ``.npy`` arrays are brought by the detector itself.

    Returns:
        (N, H, W), (N, H, W, C) or (N, C, H, W) array, uint8 or float; not yet validated for values.

    Raises:
        UploadError: 400 (not an image, corrupt) or 422 (wrong size, channels, mode or count).
    """
    files = _multipart_files(body, content_type) if content_type.lower().startswith("multipart/form-data") else [body]
    arrays = [_decode_one(f, shape, resize) for f in files]
    if len(arrays) > 1 and len({a.shape[1:] for a in arrays} | {a.dtype.kind for a in arrays}) > 2:
        raise UploadError(422, "the uploaded files differ in size, channels or type; send images of one kind")
    images = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if len(images) > MAX_BATCH:
        raise UploadError(422, f"the upload holds {len(images)} images; send at most {MAX_BATCH} per request")
    if len(images) == 0:
        raise UploadError(422, "the upload holds no image; send at least one")
    return images
