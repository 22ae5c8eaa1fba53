"""Pictures of a verdict: the image, its anomaly map over it, the nearest training image, and a caption.

Pure array → PIL code (no model): ``dgmood predict --maps`` writes one tile per image, ``report.html`` inlines them.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["overlay", "png_bytes", "png_data_uri", "tile", "to_rgb"]

_SCALE = 4  # pixels per image pixel in a tile (28 × 28 images become 112 × 112)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1], C = 1 or 3 → (H, W, 3) uint8."""
    x = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    return np.rint(x.transpose(1, 2, 0) * 255).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmax: float, alpha: float = 0.6) -> np.ndarray:
    """The map in the 'inferno' colours over the grey image: (H, W, 3) uint8.

    Map values are clipped to [0, ``vmax``]; the colour's opacity grows with the value, so pixels the map calls
    normal keep the image visible.
    """
    from matplotlib import colormaps

    level = np.clip(np.asarray(amap, dtype=np.float32) / vmax, 0.0, 1.0)
    colour = colormaps["inferno"](level)[..., :3]
    grey = to_rgb(image).astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    weight = alpha * level[..., None]
    return np.rint((grey * (1 - weight) + colour * weight) * 255).astype(np.uint8)


def tile(image: np.ndarray, amap: np.ndarray | None, nearest: np.ndarray | None, lines: list[str],
         vmax: float = 4.0) -> Image.Image:
    """One picture of a verdict: image | map overlay | nearest training image, caption lines below.

    Args:
        image: (C, H, W) in [0, 1].
        amap: (H, W) anomaly map (higher = more anomalous), or None.
        nearest: (C, H, W) nearest training image, or None.
        lines: Caption, e.g. ``["OOD  score -7.31 < -2.1", "complexity -4.1σ"]``.
        vmax: Map value shown in the brightest colour.
    """
    panels = [to_rgb(image)]
    if amap is not None:
        panels.append(overlay(image, amap, vmax))
    if nearest is not None:
        panels.append(to_rgb(nearest))
    h, w = panels[0].shape[:2]
    gap = 4
    strip = np.full((h * _SCALE, len(panels) * (w * _SCALE + gap) - gap, 3), 255, dtype=np.uint8)
    for i, p in enumerate(panels):
        big = np.kron(p, np.ones((_SCALE, _SCALE, 1), dtype=np.uint8))
        strip[:, i * (w * _SCALE + gap):i * (w * _SCALE + gap) + w * _SCALE] = big
    line_h = 12
    out = Image.new("RGB", (max(strip.shape[1], 6 * max(map(len, lines), default=0) + 4), strip.shape[0] + line_h * len(lines) + 4), "white")
    out.paste(Image.fromarray(strip), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((2, strip.shape[0] + 2 + i * line_h), text.replace("σ", "sd"), fill=(0, 0, 0))
    return out


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(data: bytes) -> str:
    """A PNG inlined for HTML: ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
