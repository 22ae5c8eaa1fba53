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
    """Distance to the k-th nearest training image in raw pixels, shape (N,), [0, 1] pixel units.

    ``fit`` keeps the training images as an 8-bit bank (``bank_``, (M, D) uint8: lossless for 8-bit images,
    a quarter of float32). The training images' own values (``compute_training``) leave each image's zero
    distance to itself out, so they are those of unseen in-distribution images. Needs no model.

    Args:
        k: Which neighbour (5: the raw-pixel 5-NN baseline).
    """

    name = "knn"
    log_scale = True
    fitted = ("bank_",)

    def __init__(self, k=5):
        self.k = int(k)
        self.bank_ = None

    def fit(self, model, images, device="cpu", progress=False):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
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
        return knn_distance(self.search_bank(), np.asarray(images, dtype=np.float32), self.k).astype(np.float64)

    def compute_training(self, model, images, device="cpu", progress=False):
        return knn_distance(self.search_bank(), np.asarray(images, dtype=np.float32), self.k,
                            exclude_self=True).astype(np.float64)

    def bank_sha256(self) -> str:
        """Checksum of the bank: part of the cache key (another bank, other distances)."""
        if getattr(self, "_sha", None) is None:
            self._sha = hashlib.sha256(np.ascontiguousarray(self.bank_).tobytes()).hexdigest()
        return self._sha

    def cache_settings(self, training: bool = False) -> dict:
        return {"k": self.k, "bank": self.bank_sha256()[:16], "leave_one_out": bool(training)}

    def set_state(self, scalars, arrays):
        super().set_state(scalars, arrays)
        if self.bank_.dtype != np.uint8 or self.bank_.ndim != 2:
            raise ValueError(f"the k-NN bank must be (M, D) uint8, got {self.bank_.dtype} {self.bank_.shape}")
        self._sha = self._search = None
        return self
