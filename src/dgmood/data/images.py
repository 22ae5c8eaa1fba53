"""One image policy: how any decoded image (any size, mode, orientation) is brought to a model's (C, H, W).

Every image that reaches a model goes through :func:`decode` (encoded files: PNG, JPEG, ...) or
:func:`fit_array` (arrays), with the same :class:`ImagePolicy`:

1. **Orientation**: the EXIF orientation tag is applied, so pixels come out upright.
2. **Mode** (:func:`to_channels`): palette images are expanded; images with transparency (RGBA, LA, a palette
   with a transparent index) are composited on white; 16-bit images are scaled to 8 bits (v / 257, rounded);
   then grey ↔ RGB (ITU-R 601-2 luma, as Pillow's ``convert("L")``).
3. **Size** (:func:`fit_size`), by ``resize``:

   - ``crop`` (default): scale so that the shorter side matches, antialiased (bilinear), then cut the
     centre (``PIL.ImageOps.fit``);
   - ``stretch``: scale each side to the model's, ignoring the aspect ratio;
   - ``pad``: scale so that the longer side matches, then centre on black (``PIL.ImageOps.pad``);
   - ``error``: refuse an image of another size (a :class:`BadImage` naming it).

   An image already of the model's size is never resampled. A JPEG much larger than the model is decoded at
   a reduced scale (1/2, 1/4 or 1/8, Pillow's ``draft``), never below what the policy needs.

Images whose header claims more than :data:`MAX_PIXELS` pixels (a decompression bomb) are refused before any
pixel is decoded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_RESIZE", "FORMATS", "IMAGE_EXTENSIONS", "MAX_PIXELS", "RESIZE_POLICIES", "BadImage", "ImagePolicy",
           "decode", "fit_array", "fit_size", "header", "to_channels"]

RESIZE_POLICIES = ("crop", "stretch", "pad", "error")
"""The ways an image of another size is brought to the model's (see the module docstring)."""

DEFAULT_RESIZE = "crop"
"""The policy of new runs and detectors (detectors saved before policies were recorded keep ``error``)."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File name endings read as images in folders and archives (case-insensitive)."""

FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP")
"""The formats Pillow may open (MPO: the multi-picture JPEG some cameras write); no other decoder is reached, so a
file posing as an image cannot invoke one (EPS's Ghostscript, say)."""

MAX_PIXELS = 89_478_485
"""Largest width × height decoded (Pillow's own bomb limit, 0.25 GB of 24-bit pixels); bigger is refused."""

_FILTER = 2  # PIL.Image.Resampling.BILINEAR: antialiased when downscaling (Pillow widens its support)
_PAD_COLOUR = 0
_WHITE = (255, 255, 255, 255)


class BadImage(ValueError):
    """One image that cannot be used. ``source`` names it, ``reason`` says what is wrong, ``kind`` is one of
    ``unknown`` (not an image Pillow reads), ``corrupt`` (a damaged header or truncated data), ``empty``,
    ``too-large`` (a decompression bomb, an oversized file) or ``size`` (another size under the ``error`` policy);
    ``str()`` is one line with what to do."""

    def __init__(self, source: str, reason: str, fix: str = "replace or remove it, or pass --skip-bad",
                 kind: str = "corrupt"):
        super().__init__(f"{source}: {reason}; {fix}")
        self.source, self.reason, self.fix, self.kind = source, reason, fix, kind

    def __reduce__(self):  # pickled by name and fields (a decoding process sends it back)
        return BadImage, (self.source, self.reason, self.fix, self.kind)


@dataclass(frozen=True)
class ImagePolicy:
    """How images are brought to a model.

    Attributes:
        shape: the model's (C, H, W); C is 1 (grey) or 3 (RGB).
        resize: one of :data:`RESIZE_POLICIES`.
    """

    shape: tuple[int, int, int]
    resize: str = DEFAULT_RESIZE

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; use one of {', '.join(RESIZE_POLICIES)}")
        c, h, w = (int(d) for d in self.shape)
        if c not in (1, 3) or h < 1 or w < 1:
            raise ValueError(f"image shape must be (C, H, W) with C = 1 or 3, got {self.shape!r}")
        object.__setattr__(self, "shape", (c, h, w))

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.shape[1], self.shape[2]


# ----------------------------------------------------------------------------- reading


def _open(data: bytes, source: str):
    """A lazily decoded PIL image (header read, size checked), or BadImage."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(source, "the file is empty (0 bytes)", kind="empty")
    try:
        Image.init()  # registers every plugin once (MPO's too), so FORMATS can all be named
        im = Image.open(io.BytesIO(data), formats=[f for f in FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError as err:
        raise BadImage(source, f"{err} (a decompression bomb?)", "shrink it, or remove it or pass --skip-bad",
                       "too-large") from None
    except UnidentifiedImageError:
        raise BadImage(source, "not an image Pillow can read (unknown or corrupt format)", kind="unknown") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as err:
        raise BadImage(source, f"corrupt image header ({err})") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise BadImage(source, f"{w}x{h} pixels is over the {MAX_PIXELS:,}-pixel limit (a decompression bomb?)",
                       "shrink it, or remove it or pass --skip-bad", "too-large")
    if w < 1 or h < 1:
        raise BadImage(source, f"the image has no pixels ({w}x{h})", kind="empty")
    return im


def _upright_size(im) -> tuple[int, int]:
    """(H, W) after the EXIF orientation is applied."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001  (a damaged EXIF block: the stored orientation)
        orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def header(data: bytes, source: str) -> tuple[int, int, int]:
    """(C, H, W) an image would have after orientation and mode rules, from its header only.

    C is 1 for images without colour (L, LA, 1, I;16, I, F; palettes whose entries are all grey count as colour),
    else 3.
    """
    with _open(data, source) as im:
        h, w = _upright_size(im)
        grey = im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16")
        return (1 if grey else 3), h, w


def _sixteen_to_eight(im):
    """A 16- or 32-bit integer grey image as 8-bit L: v / 257 rounded (65535 → 255), clipped to 0..255."""
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")


def _composite_on_white(im):
    """An image with alpha as RGB over a white background."""
    from PIL import Image

    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    background.alpha_composite(rgba)
    return background.convert("RGB")


def to_channels(im, channels: int):
    """A loaded PIL image in mode L (``channels`` = 1) or RGB (3) by the module's mode rules (step 2)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        im = _sixteen_to_eight(im)
    elif im.mode == "F":
        im = im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = _composite_on_white(im)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _cover_scale(h: int, w: int, size: tuple[int, int], resize: str) -> float:
    """The factor an (h, w) image is scaled by under ``resize`` (crop: cover; pad: fit inside)."""
    (th, tw) = size
    if resize == "crop":
        return max(th / h, tw / w)
    if resize == "pad":
        return min(th / h, tw / w)
    return 1.0


def _draft(im, size: tuple[int, int], resize: str) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the policy needs no more pixels than that."""
    if im.format != "JPEG" or resize == "error":
        return
    w, h = im.size
    (th, tw) = size if _upright_size(im) == (h, w) else size[::-1]
    if resize == "stretch":
        need = (tw, th)
    else:
        scale = _cover_scale(h, w, (th, tw), resize)
        need = (math.ceil(w * scale), math.ceil(h * scale))
    if need[0] * 2 <= w and need[1] * 2 <= h:
        im.draft(im.mode, need)


def fit_size(im, size: tuple[int, int], resize: str, source: str = "image"):
    """``im`` brought to (H, W) ``size`` by policy ``resize`` (step 3); unchanged when it already has that size.

    Raises:
        BadImage: ``resize`` is ``error`` and the size differs.
    """
    from PIL import ImageOps

    (th, tw) = size
    if im.size == (tw, th):
        return im
    if resize == "error":
        raise BadImage(source, f"the image is {im.height}x{im.width} but the model takes {th}x{tw}",
                       "resize it, or pass --resize crop|stretch|pad", "size")
    if resize == "stretch":
        return im.resize((tw, th), _FILTER)
    if resize == "pad":
        return ImageOps.pad(im, (tw, th), _FILTER, color=_PAD_COLOUR)
    return ImageOps.fit(im, (tw, th), _FILTER)


def decode(data: bytes, source: str, policy: ImagePolicy) -> tuple[np.ndarray, tuple[int, int]]:
    """One encoded image brought to the model by ``policy``.

    Args:
        data: the file's bytes (PNG, JPEG, BMP, GIF (first frame), TIFF, WebP).
        source: its name in messages (a path, or an archive member).
        policy: the model's :class:`ImagePolicy`.

    Returns:
        ((C, H, W) uint8 array, (height, width) of the upright original in pixels).

    Raises:
        BadImage: empty, corrupt or truncated data, a decompression bomb, or a size refused by ``error``.
    """
    from PIL import Image, ImageOps

    with _open(data, source) as im:
        original = _upright_size(im)
        try:
            _draft(im, policy.size, policy.resize)
            im.load()
            upright = ImageOps.exif_transpose(im)
            out = fit_size(to_channels(upright, policy.shape[0]), policy.size, policy.resize, source)
            arr = np.asarray(out, dtype=np.uint8)
        except BadImage:
            raise
        except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as err:
            raise BadImage(source, f"truncated or corrupt image data ({err})") from None
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), original


# ----------------------------------------------------------------------------- arrays


def _luma(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) → (N, 1, H, W) by ITU-R 601-2 luma (R 0.299, G 0.587, B 0.114)."""
    return np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), x, axes=([0], [1]))[:, None]


def _fit_float(image: np.ndarray, size: tuple[int, int], resize: str, source: str) -> np.ndarray:
    """One (C, H, W) float image resized channel by channel in Pillow's 32-bit float mode."""
    from PIL import Image

    channels = [np.asarray(fit_size(Image.fromarray(np.ascontiguousarray(c, np.float32), "F"), size, resize, source))
                for c in image]
    return np.stack(channels)


def _fit_uint8(image: np.ndarray, policy: ImagePolicy, source: str) -> np.ndarray:
    """One (C, H, W) uint8 image through the same Pillow steps as a decoded file: (C', H', W') uint8."""
    from PIL import Image

    im = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    arr = np.asarray(fit_size(to_channels(im, policy.shape[0]), policy.size, policy.resize, source))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def fit_array(x: np.ndarray, policy: ImagePolicy, label: str = "input") -> np.ndarray:
    """Images already in memory brought to the model by ``policy`` (channels, then size).

    uint8 images take exactly the steps of :func:`decode` (an array scores as the PNG of its pixels would);
    float images are converted by luma / repetition and resized channel by channel in Pillow's float mode.

    Args:
        x: (N, C, H, W) uint8, or float32 in [0, 1]; C = 1 or 3.
        policy: the model's :class:`ImagePolicy`.
        label: the images' name in messages.

    Returns:
        (N, C', H', W') float32 in [0, 1] of the model's shape.

    Raises:
        BadImage: ``resize`` is ``error`` and the size differs.
    """
    if x.dtype == np.uint8:
        if x.shape[1:] == policy.shape:
            return x.astype(np.float32) / np.float32(255.0)
        out = np.stack([_fit_uint8(im, policy, f"{label}#{i}") for i, im in enumerate(x)])
        return out.astype(np.float32) / np.float32(255.0)
    c = policy.shape[0]
    if x.shape[1] != c:
        x = _luma(x) if c == 1 else np.repeat(x, 3, axis=1)
    if tuple(x.shape[2:]) == policy.size:
        return np.ascontiguousarray(x, dtype=np.float32)
    out = np.stack([_fit_float(im, policy.size, policy.resize, f"{label}#{i}") for i, im in enumerate(x)])
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
