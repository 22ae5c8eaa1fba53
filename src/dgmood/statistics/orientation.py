"""Orientation: is the image the way up the training images are, or is one of its flips or rotations closer?

A flipped or rotated in-distribution image keeps its content, its pixel statistics and much of what the score
model sees (docs/results.md: every other statistic misses part of them), but one of its symmetries, the inverse
of what happened to it, brings it back among the training images. So compare the image's distance to its k-th
nearest training image with that of its best symmetry (eq. O1)::

    O(x) = log d_k(P x) − min_{g ∈ G} log d_k(P g x)

P average-pools the image to a coarse grid (the layout that a flip changes, at a fraction of the raw search's
cost); G are the symmetries of the image's rectangle other than the identity: for a square image the three
rotations and four reflections of the dihedral group, else the two flips and the half turn. O is near 0 or
negative for an image the training images hold in its own orientation, and positive when a flip or rotation of
it looks more like them. A symmetric image (a bag, a digit 0 upside down) gains nothing from turning, and scores
as an upright one: such shifts cannot be told from the image alone.

With ``mirror`` (a model trained on randomly mirrored images, ``dgmood train --hflip``) a left-right mirror is no
shift: distances are to the training images and their mirrors, d^m_k(x) = the k-th smallest of the neighbour
distances of x and of its mirror h x (eq. O2), and G keeps one symmetry per pair {g, h g}::

    O_m(x) = log d^m_k(P x) − min_{g ∈ G_m} log d^m_k(P g x),   G_m = {vflip, rot90, rot270} (square) or {vflip}

so O_m(h x) = O_m(x) exactly: a mirrored image scores as the original.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dgmood.statistics.base import Statistic, array_digest, register

__all__ = ["Orientation", "mirror_symmetries", "pooled", "symmetries"]


def symmetries(height: int, width: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The non-identity symmetries of an H × W image as functions of (N, C, H, W) arrays: the dihedral group's
    seven for a square image, else the vertical and horizontal flips and the half turn."""
    out = {"vflip": lambda x: x[..., ::-1, :], "hflip": lambda x: x[..., ::-1], "rot180": lambda x: x[..., ::-1, ::-1]}
    if height == width:
        out |= {"rot90": lambda x: np.rot90(x, 1, (-2, -1)), "rot270": lambda x: np.rot90(x, 3, (-2, -1)),
                "transpose": lambda x: np.swapaxes(x, -2, -1),
                "antitranspose": lambda x: np.swapaxes(x, -2, -1)[..., ::-1, ::-1]}
    return out


def mirror_symmetries(height: int, width: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """One symmetry of each pair {g, hflip ∘ g} other than the identity's: those of an H × W image that are shifts when
    left-right mirrors are not (eq. O2)."""
    turns = symmetries(height, width)
    return {name: turns[name] for name in ("vflip", "rot90", "rot270") if name in turns}


def pooled(images: np.ndarray, grid: int) -> np.ndarray:
    """Images (N, C, H, W) averaged over a ``grid`` × ``grid`` partition (PyTorch's adaptive average pooling; 28 × 28
    images at grid 7 are 4 × 4 means), flattened: (N, C · grid²) float32."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return F.adaptive_avg_pool2d(x, grid).flatten(1).numpy()


@register
class Orientation(Statistic):
    """Eq. O1: log distance of the pooled image to its k-th nearest pooled training image, minus the least such log
    distance over its symmetries; (N,), positive where a flip or rotation of the image is nearer the training images.

    ``fit`` keeps the first ``max_bank`` training images pooled (``bank_``, float32 (M, C · grid²)). Training images'
    own values leave the image itself out of every search (a symmetric image would otherwise meet itself). Needs no
    model.

    Args:
        grid: Pooled grid size per side.
        k: Which neighbour.
        max_bank: Training images in the bank (at most).
        mirror: Left-right mirrors are no shift (eq. O2): for a model trained on randomly mirrored images.
    """

    name = "orientation"
    fitted = ("bank_",)

    def __init__(self, grid=7, k=5, max_bank=20000, mirror=False):
        self.grid, self.k, self.max_bank, self.mirror = int(grid), int(k), int(max_bank), bool(mirror)
        self.bank_ = None

    def fit(self, model, images, device="cpu", progress=False):
        if self.grid < 1 or self.k < 1 or self.max_bank < self.k + 1:
            raise ValueError(f"grid and k must be >= 1 and max_bank > k, got {self.grid}, {self.k}, {self.max_bank}")
        self.bank_ = pooled(np.asarray(images)[:self.max_bank], self.grid)
        return self

    def _values(self, images, leave_out: bool) -> np.ndarray:
        from dgmood.statistics.neighbours import kneighbors

        if self.bank_ is None:
            raise ValueError("Orientation is not fitted; call fit(model, train_images) first")
        x = np.asarray(images, dtype=np.float32)
        turns = (mirror_symmetries if self.mirror else symmetries)(*x.shape[-2:])
        views = [x] + [g(x) for g in turns.values()]
        if self.mirror:  # each view beside its mirror: eq. O2's distances are to the bank and its mirrors
            views = [v for view in views for v in (view, view[..., ::-1])]
        queries = np.concatenate([pooled(np.ascontiguousarray(v), self.grid) for v in views])
        exclude = np.tile(np.arange(len(x)), len(views)) if leave_out else None
        d = kneighbors(self.bank_, queries, self.k, exclude=exclude)[0].reshape(len(views), len(x), self.k)
        if self.mirror:  # k-th smallest of the 2k distances of a view and its mirror
            d = np.sort(np.concatenate([d[0::2], d[1::2]], axis=2), axis=2)
        logs = np.log(np.maximum(d[..., self.k - 1], 1e-6))
        return logs[0] - logs[1:].min(axis=0)

    def compute(self, model, images, device="cpu", progress=False):
        return self._values(images, False)

    def compute_training(self, model, images, device="cpu", progress=False):
        return self._values(images, True)

    def cache_settings(self, training: bool = False) -> dict:
        return {**self.get_params(), "bank": array_digest(self.bank_), "leave_one_out": bool(training)}
