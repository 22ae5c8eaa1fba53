"""Raw-pixel k-NN distance: Euclidean distance from an image to its k-th nearest training image."""

from __future__ import annotations

import hashlib

import numpy as np

from dgmood.statistics.base import Statistic, register

__all__ = ["PixelKNN", "knn_distance", "to_uint8"]


def knn_distance(bank, queries: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance in raw pixels from each query to its k-th nearest image of ``bank``, shape (N,).

    Args:
        bank: Reference images (M, C, H, W) or (M, D), pixel scale (uint8 rows: levels / 255), or a
            :class:`~dgmood.statistics.neighbours.SearchBank` of them.
        queries: Images (N, C, H, W) or (N, D) of the same size.
        k: Which neighbour.
        exclude_self: The queries are rows of ``bank``: skip the zero distance to themselves (leave-one-out).
    """
    from dgmood.statistics.neighbours import kneighbors

    kk = k + int(exclude_self)
    if len(bank) < kk:
        raise ValueError(f"the k-NN term needs at least {kk} training images, got {len(bank)}")
    return kneighbors(bank, queries, kk)[0][:, -1]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images on the [0, 1] scale as 8-bit levels round(255 x), flattened to (N, D) uint8."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


@register
class PixelKNN(Statistic):
    """Distance to the k-th nearest training image in raw pixels, shape (N,), [0, 1] pixel units; with ``local_k``
    also the local residual against the ``local_k`` nearest (eqs. L2–L3, :mod:`dgmood.statistics.residual`), then
    shape (N, 2): (residual, distance), squared pixel units and pixel units.

    ``fit`` keeps the training images as an 8-bit bank (``bank_``, (M, D) uint8: lossless for 8-bit images,
    a quarter of float32). The training images' own values (``compute_training``) leave each image's zero
    distance to itself out, so they are those of unseen in-distribution images. Both readings come from one search.
    Needs no model.

    Args:
        k: Which neighbour (5: the raw-pixel 5-NN baseline).
        local_k: Neighbours K of the local residual; 0 leaves it out (what detectors saved before it use).
        patch, shift: The residual's patch side and largest shift, pixels (eq. L2). No shift by default: one-pixel
            shifts cost 9× the alignments (+15 s per 10,000 CIFAR-10 images against +2 s) for ≤ 0.016 AUROC on
            FashionMNIST's defect checks (docs/results.md).
    """

    name = "knn"
    log_scale = True
    fitted = ("bank_",)

    def __init__(self, k=5, local_k=0, patch=5, shift=0):
        self.k, self.local_k, self.patch, self.shift = int(k), int(local_k), int(patch), int(shift)
        self.bank_ = None

    def fit(self, model, images, device="cpu", progress=False):
        if self.k < 1 or self.local_k < 0:
            raise ValueError(f"k must be >= 1 and local_k >= 0, got {self.k} and {self.local_k}")
        if self.patch < 1 or self.patch % 2 == 0 or self.shift < 0:
            raise ValueError(f"patch must be odd and >= 1 and shift >= 0, got {self.patch} and {self.shift}")
        self.bank_ = to_uint8(images)
        self._sha = self._search = None
        return self

    def search_bank(self):
        """The bank made ready for searching, once (:func:`~dgmood.statistics.neighbours.prepare`)."""
        from dgmood.statistics.neighbours import prepare

        if self.bank_ is None:
            raise ValueError("PixelKNN is not fitted; call fit(model, train_images) first")
        search = getattr(self, "_search", None)
        if search is None or search[0] is not self.bank_:  # first search, or a bank assigned since
            self._search = search = (self.bank_, prepare(self.bank_))
        return search[1]

    def compute(self, model, images, device="cpu", progress=False):
        return self._values(np.asarray(images, dtype=np.float32), skip=0)

    def compute_training(self, model, images, device="cpu", progress=False):
        return self._values(np.asarray(images, dtype=np.float32), skip=1)

    def _values(self, images: np.ndarray, skip: int, chunk: int = 512) -> np.ndarray:
        """Both readings, a chunk of images at a time; ``skip`` nearest neighbours left out (1: the image itself)."""
        from dgmood.statistics.neighbours import kneighbors
        from dgmood.statistics.residual import peak_residual

        need, space = max(self.k, self.local_k) + skip, self.search_bank()
        if len(space) < need:
            raise ValueError(f"the k-NN term needs at least {need} training images, got {len(space)}")
        out = np.empty((len(images), 2 if self.local_k else 1), np.float64)
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk]
            dist, index = kneighbors(space, x, need)
            out[start:start + len(x), -1] = dist[:, self.k + skip - 1]
            if self.local_k:
                picked = index[:, skip:skip + self.local_k]
                levels = self.bank_[picked].reshape(*picked.shape, *x.shape[1:])  # uint8, converted by torch
                out[start:start + len(x), 0] = peak_residual(x * 255.0, levels, self.patch, self.shift) / 255.0 ** 2
        return out if self.local_k else out[:, 0]

    def columns(self, n_columns: int) -> list[str]:
        return ["knn-local", "knn"] if n_columns == 2 else super().columns(n_columns)

    def bank_sha256(self) -> str:
        """Checksum of the bank: part of the cache key (another bank, other distances)."""
        if getattr(self, "_sha", None) is None:
            self._sha = hashlib.sha256(np.ascontiguousarray(self.bank_).tobytes()).hexdigest()
        return self._sha

    def cache_settings(self, training: bool = False) -> dict:
        local = {"local_k": self.local_k, "patch": self.patch, "shift": self.shift} if self.local_k else {}
        return {"k": self.k, "bank": self.bank_sha256()[:16], "leave_one_out": bool(training), **local}

    def set_state(self, scalars, arrays):
        super().set_state(scalars, arrays)
        if self.bank_.dtype != np.uint8 or self.bank_.ndim != 2:
            raise ValueError(f"the k-NN bank must be (M, D) uint8, got {self.bank_.dtype} {self.bank_.shape}")
        self._sha = self._search = None
        return self
