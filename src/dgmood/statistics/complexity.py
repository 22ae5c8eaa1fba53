"""Baselines the dual threshold is compared with: input complexity (Serrà et al. 2020) and the
likelihood ratio to a background model trained on perturbed inputs (Ren et al. 2019).

Sign conventions differ between the two, as in the papers: :func:`complexity_score` is higher for
more OOD inputs, :func:`likelihood_ratio` is higher for more in-distribution inputs (as every
detector in :mod:`dgmood.detectors.estimators`).
"""

from __future__ import annotations

import importlib
import io
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFile

from dgmood.models.perturb import DEFAULT_MU, perturb  # noqa: F401  (the background model's input)

__all__ = [
    "CODECS",
    "DEFAULT_MU",
    "JPEG2000_MAX_RESOLUTIONS",
    "PNG_STRATEGIES",
    "available_codecs",
    "complexity_score",
    "compressed_bits_per_dim",
    "likelihood_ratio",
    "perturb",
    "png_filtered_rows",
    "png_sizes",
]

CODECS = ("png", "jpeg2000", "jpegxl")
"""Lossless codecs :func:`compressed_bits_per_dim` knows; ``jpegxl`` needs the optional
``pillow_jxl`` plugin (``pip install pillow-jxl-plugin``), see :func:`available_codecs`."""

PNG_STRATEGIES = (0, 1, 2, 3, 4)
"""zlib strategies tried for PNG at compression level 9: default, filtered, Huffman only, RLE, fixed.
(Pillow's ``optimize=True`` was measured larger than level 9 on FashionMNIST, so it is not used.)"""

JPEG2000_MAX_RESOLUTIONS = 6
"""Most resolution levels tried for JPEG2000 (OpenJPEG's default: 5 wavelet decompositions)."""


# --- input complexity (Serrà et al. 2020) ------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    """Smallest PNG over :data:`PNG_STRATEGIES` at zlib level 9 (whole file: 57 bytes of chunks included)."""
    return min((_encode(image, "PNG", compress_level=9, compress_type=s) for s in PNG_STRATEGIES), key=len)


def _jpeg2000(image: Image.Image) -> bytes:
    """Smallest lossless JPEG2000 codestream (reversible 5/3 integer wavelet, no JP2 boxes) over the
    number of resolution levels (1 = no decomposition, up to what the image size allows) and, for
    RGB, with and without the reversible colour transform."""
    levels = min(JPEG2000_MAX_RESOLUTIONS, min(image.size).bit_length())
    mcts = (0, 1) if image.mode == "RGB" else (0,)
    options = [dict(num_resolutions=r, mct=m) for r in range(1, levels + 1) for m in mcts]
    return min((_encode(image, "JPEG2000", no_jp2=True, irreversible=False, **o) for o in options), key=len)


def _jpegxl(image: Image.Image) -> bytes:
    """Lossless JPEG XL codestream (no container) at the highest effort, via ``pillow_jxl``."""
    return _encode(image, "JXL", lossless=True, effort=9, use_container=False, num_threads=1)


_ENCODERS: dict[str, Callable[[Image.Image], bytes]] = {"png": _png, "jpeg2000": _jpeg2000, "jpegxl": _jpegxl}

_PNG_CHUNKS = 57
"""Bytes of a Pillow PNG of an L or RGB image besides its compressed data: signature 8, IHDR 25, one IDAT's
length, type and CRC 12, IEND 12 (and 12 more per further IDAT chunk)."""


def _filter_cost(v: np.ndarray) -> np.ndarray:
    """libpng's filter heuristic: Σ min(v, 256 − v) over a row of filtered bytes v (as signed bytes' |v|)."""
    return np.where(v < 128, v, 256 - v).sum(-1)


def png_filtered_rows(levels: np.ndarray) -> np.ndarray:
    """The filtered scanlines Pillow's PNG encoder deflates: each row of (N, H, W, C) uint8 levels with the
    filter (0 none, 1 sub, 2 up, 4 Paeth; 3 average only under ``optimize``) of least Σ min(v, 256 − v),
    tried in Pillow's order none, up, sub, Paeth, a later one taken only when strictly smaller and while the best
    is above 0; (N, H, 1 + W·C) uint8, the filter type first (PNG spec §9). Vectorised over all rows at once."""
    n, h, w, c = levels.shape
    x = levels.reshape(n, h, w * c).astype(np.int16)
    up = np.zeros_like(x)
    up[:, 1:] = x[:, :-1]  # the raw row above, black above the first
    left, up_left = np.zeros_like(x), np.zeros_like(x)
    left[:, :, c:], up_left[:, :, c:] = x[:, :, :-c], up[:, :, :-c]
    pa, pb, pc = np.abs(up - up_left), np.abs(left - up_left), np.abs(left + up - 2 * up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    filtered = {0: x, 2: (x - up) & 255, 1: (x - left) & 255, 4: (x - paeth) & 255}
    kind, best = np.zeros((n, h), np.uint8), _filter_cost(x)
    for k in (2, 1, 4):
        cost = _filter_cost(filtered[k])
        take = (best > 0) & (cost < best)
        kind[take], best = k, np.where(take, cost, best)
    out = np.empty((n, h, 1 + w * c), np.uint8)
    out[:, :, 0] = kind
    out[:, :, 1:] = np.select([kind[..., None] == k for k in filtered], list(filtered.values()))
    return out


def png_sizes(levels: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Bytes of the smallest PNG over :data:`PNG_STRATEGIES` at zlib level 9 of each (N, H, W, C) uint8 image,
    C = 1 or 3: the same number as ``len`` of Pillow's smallest encoding (:func:`_png`; tested equal), without
    Pillow's per-file work: the rows filtered as Pillow filters them (:func:`png_filtered_rows`), deflated with
    its zlib settings (window 15, memory level 9), plus the chunks around them (:data:`_PNG_CHUNKS`; one more IDAT
    chunk per 64 KiB of data, Pillow's write size). (N,) int64.

    The images are deflated by ``threads`` threads (default: torch's thread count): zlib releases the GIL while
    it compresses."""
    rows = png_filtered_rows(levels)
    block = max(ImageFile.MAXBLOCK, levels.shape[2] * 4)
    out = np.empty(len(rows), np.int64)

    def deflate(part: slice) -> None:
        for i in range(part.start, part.stop):
            data = rows[i].tobytes()
            size = min(_deflated_size(data, strategy) for strategy in PNG_STRATEGIES)
            out[i] = _PNG_CHUNKS + size + 12 * (max(1, -(-size // block)) - 1)

    workers = max(1, min(int(threads or torch.get_num_threads()), len(rows)))
    bounds = np.linspace(0, len(rows), workers + 1).astype(int)
    parts = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if workers == 1:
        deflate(parts[0])
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="dgmood-png") as pool:
            list(pool.map(deflate, parts))
    return out


def _deflated_size(data: bytes, strategy: int) -> int:
    """Bytes of ``data`` deflated by zlib at level 9, window 15, memory level 9 and ``strategy``."""
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 9, strategy)
    return len(z.compress(data)) + len(z.flush())


def _has_jxl() -> bool:
    try:
        importlib.import_module("pillow_jxl")  # registers the JXL format with Pillow
    except ImportError:
        return False
    return True


def available_codecs() -> tuple[str, ...]:
    """The codecs of :data:`CODECS` usable now (``jpegxl`` only when ``pillow_jxl`` imports)."""
    return tuple(c for c in CODECS if c != "jpegxl" or _has_jxl())


def _encoders(codecs: str | Iterable[str]) -> list[Callable[[Image.Image], bytes]]:
    names = [codecs] if isinstance(codecs, str) else list(codecs)
    if not names:
        raise ValueError(f"codecs is empty: name at least one of {', '.join(CODECS)}")
    for name in names:
        if name not in CODECS:
            raise ValueError(f"unknown codec {name!r}: choose from {', '.join(CODECS)}")
        if name == "jpegxl" and not _has_jxl():
            raise ValueError("codec 'jpegxl' needs the pillow_jxl plugin: pip install pillow-jxl-plugin")
    return [_ENCODERS[name] for name in dict.fromkeys(names)]


def _levels(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, C, H, W) uint8, or floats in [0, 1] rounded to the nearest of 256 levels, as (N, H, W, C) uint8."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C = 1 or 3, got {a.shape}")
    if a.size == 0:
        raise ValueError(f"images is empty: shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "fiu":
            raise ValueError(f"images must be uint8 or real numbers in [0, 1], got dtype {a.dtype}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("images contain NaN or inf")
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"image values must lie in [0, 1] (or pass uint8), got [{a.min():g}, {a.max():g}]")
        a = np.rint(a * 255).astype(np.uint8)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _size_bytes(encode: Callable[[Image.Image], bytes], image: Image.Image, verify: bool) -> int:
    data = encode(image)
    if verify:
        with Image.open(io.BytesIO(data)) as decoded:
            if decoded.mode != image.mode or not np.array_equal(np.asarray(decoded), np.asarray(image)):
                raise RuntimeError(f"{encode.__name__.lstrip('_')} did not round-trip bit-exactly")
    return len(data)


def compressed_bits_per_dim(
    images: np.ndarray | torch.Tensor,
    codecs: str | Iterable[str] = ("png", "jpeg2000"),
    *,
    verify: bool = False,
) -> np.ndarray:
    """Input complexity L(x): size of the losslessly compressed 8-bit image in bits per dimension,
    the minimum over ``codecs`` (Serrà et al. 2020: L(x) = |C(x)| / D, with the best of
    PNG, JPEG2000 and FLIF there; JPEG XL, FLIF's successor, stands in for FLIF when available).

    Each image is quantised to 8 bits (nearest of the levels k/255), encoded in memory with Pillow,
    and its whole encoded size counted, headers included. For a 28×28 greyscale image the PNG chunks
    (57 bytes) add 0.58 bits/dim and the JPEG2000 codestream headers about 1.3: a constant image
    costs 0.81 (PNG) or 1.45 (JPEG2000), uniform noise (8 bits/dim of entropy) 8.98 or 9.74. Each
    codec returns the smallest of its own lossless settings (PNG: :data:`PNG_STRATEGIES`, Pillow
    picks the row filters; JPEG2000: 1 to 5 resolution levels, where the default 5 costs 0.85
    bits/dim more on FashionMNIST than the best; RGB: with and without the colour transform).
    Measured on the first 1000 test images, PNG is smaller than JPEG2000 on every one, so the
    two-codec minimum is PNG's: FashionMNIST 5.11 bits/dim (JPEG2000 6.14), MNIST 2.68 (4.22).
    JPEG2000 wins on smooth images (a 28×28 Gaussian bump). JPEG XL (pillow-jxl-plugin 1.3.8,
    effort 9) is smaller still: 4.31 and 2.18 on the first 300 of each.

    Time per 28×28 greyscale image on this machine (2 cores shared with a training job; best and
    median of 5 runs over 500 FashionMNIST images): PNG 0.46 / 0.58 ms (5 encodings), JPEG2000
    1.03 / 1.20 ms (5 encodings), JPEG XL about 2.5 ms; ``verify`` adds about 0.8 ms for the two
    default codecs.

    Arguments:
        images: shape (N, C, H, W), C = 1 or 3; floats in [0, 1] or uint8 levels.
        codecs: names from :data:`CODECS` (one name or several).
        verify: decode every encoding and raise ``RuntimeError`` unless it equals the input.

    Returns:
        shape (N,), float64, bits per dimension (bits / (C·H·W)).
    """
    encoders = _encoders(codecs)
    levels = _levels(images)
    out = np.full(len(levels), np.inf)
    if _png in encoders and not verify:  # the same sizes as Pillow's, in one vectorised filtering pass
        encoders = [e for e in encoders if e is not _png]
        out = png_sizes(levels).astype(np.float64)
    for i, a in enumerate(levels if encoders else ()):
        image = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        out[i] = min(out[i], *(_size_bytes(encode, image, verify) for encode in encoders))
    return out * 8 / levels[0].size


def _scores(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    a = a.astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _difference(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, names: tuple[str, str]) -> np.ndarray:
    x, y = _scores(a, names[0]), _scores(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in shape: {x.shape} vs {y.shape}")
    return x - y


def complexity_score(bpd: np.ndarray | torch.Tensor, complexity_bpd: np.ndarray | torch.Tensor) -> np.ndarray:
    """Serrà et al. (2020) OOD score S(x) = −ℓ_M(x) − L(x) (their eq. 2), in bits per dimension.

    −ℓ_M(x) is the model's negative log-likelihood of the 8-bit image in bits/dim (``bpd`` from
    :func:`dgmood.models.flow.bits_per_dim` or :func:`dgmood.models.diffusion` — a density on [0, 1]^D must first
    add log2 256 = 8 bits/dim, which those do); L(x) from :func:`compressed_bits_per_dim`. S is a
    log-likelihood ratio between the model and the compressor read as a universal model
    p_0(x) = 2^(−D·L(x)): **higher = more OOD**, unlike dgmood's detectors (negate for those).

    Arguments:
        bpd: shape (N,), bits/dim.
        complexity_bpd: shape (N,), bits/dim.

    Returns:
        shape (N,), float64, bits/dim.
    """
    return _difference(bpd, complexity_bpd, ("bpd", "complexity_bpd"))


# --- likelihood ratio (Ren et al. 2019) ---------------------------------------------------------------------------


def likelihood_ratio(
    log_p_model: np.ndarray | torch.Tensor, log_p_background: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Ren et al. (2019) likelihood-ratio statistic LLR(x) = log p_θ(x) − log p_θ₀(x).

    p_θ is the model trained on in-distribution data, p_θ₀ the same architecture trained on
    :func:`perturb`-ed data. Both in the same units (nats or bits per image, or both per dimension);
    the result is in those units. **Higher = more in-distribution.**

    Arguments:
        log_p_model: shape (N,).
        log_p_background: shape (N,).

    Returns:
        shape (N,), float64.
    """
    return _difference(log_p_model, log_p_background, ("log_p_model", "log_p_background"))


from dgmood.statistics.base import Statistic, register  # noqa: E402  (the statistic wraps the function above)


@register
class Complexity(Statistic):
    """Input complexity (Serrà et al. 2020): compressed bits per dimension, the minimum over ``codecs``, (N,).

    Needs no model; ``compute`` ignores it.

    Args:
        codecs: Names from :data:`CODECS` (default PNG and lossless JPEG2000, as the paper's baseline).
    """

    name = "complexity"

    def __init__(self, codecs=("png", "jpeg2000")):
        self.codecs = tuple(codecs)

    def compute(self, model, images, device="cpu", progress=False):
        return compressed_bits_per_dim(np.asarray(images), self.codecs).astype(np.float64)
