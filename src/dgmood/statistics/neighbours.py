"""Exact brute-force nearest neighbours in Euclidean distance, as chunked matrix products.

scikit-learn's brute ``NearestNeighbors`` does the same search; on 5,000 queries against the 60,000-image
FashionMNIST bank on 2 cores it took 1.02 ms per query against 0.50 here (issue 11). This runs one matrix product
per chunk of queries and bank rows and keeps only the k smallest; tests/test_neighbours.py checks it against
scikit-learn. Between 8-bit images (a uint8 bank, queries on the 8-bit grid) the product is of int8 levels with
int32 sums (eq. K2), exact and several times faster than fp32 on CPUs with integer dot-product units but ~16x
slower without them, so it runs only where a probe measured it faster (:func:`dgmood.utils.kernels.knn_kernel`,
``DGMOOD_KERNELS=knn=int8|fp32`` forces either); otherwise it is fp32 (eq. K0). Both give the same neighbours: the
int8 distances are exact integers, the fp32 search's final k are re-ranked in float64. A bank searched many times
(a statistic's training images, chunk after chunk of a predict) is made ready once (:func:`prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dgmood.utils import kernels

__all__ = ["SPARE", "SearchBank", "kneighbors", "level_distances", "prepare", "squared_distances"]

SPARE = 8
"""Candidates beyond k kept from the fp32 search and re-ranked by exact float64 distances (fp32 rounding of
‖q‖² − 2 q·b + ‖b‖² is ~1e-6 relative and varies with the batch's kernel; the re-ranking removes both)."""


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """Eq. K0: ‖q − b‖² = ‖q‖² − 2 q·b + ‖b‖², clamped at 0; (N, D), (M, D), (M,) → (N, M)."""
    d2 = torch.addmm(bank_sq[None, :], queries, bank.T, alpha=-2.0)
    d2 += (queries * queries).sum(1, keepdim=True)
    return d2.clamp_(min=0.0)


def level_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """Eq. K2: eq. K0 on 8-bit levels shifted to int8 (u − 128; distances are shift-invariant), the dot products
    summed in int32: exact squared level distances, 255² times those in [0, 1] units. (N, D) int8, (M, D) int8,
    (M,) int32 → (N, M) int32 (at most D · 255², so D up to 33,000 values)."""
    d2 = torch._int_mm(queries, bank.T).mul_(-2)
    d2 += bank_sq[None, :]
    d2 += queries.int().square().sum(1, keepdim=True, dtype=torch.int32)
    return d2


@dataclass(frozen=True)
class SearchBank:
    """A bank made ready once for many searches (:func:`prepare`): its rows as the candidate search reads them and
    their squared norms, which on a 50,000-image CIFAR-10 bank cost about a second to make.

    Attributes:
        values: (M, D) the bank as given (uint8 levels or float).
        rows: (M, D) int8 levels − 128 (``levels``) or float32 on the [0, 1] scale.
        sq: (M,) ‖row‖², int32 for levels, else float32.
        levels: Whether the search runs on int8 levels (eq. K2).
    """

    values: np.ndarray
    rows: torch.Tensor
    sq: torch.Tensor
    levels: bool

    def __len__(self) -> int:
        return len(self.values)


def prepare(bank, int8: bool | None = None) -> SearchBank:
    """``bank`` (M, ...) uint8 levels or float, made ready for :func:`kneighbors`: int8 levels between 8-bit images
    where the int8 kernel is chosen (:func:`dgmood.utils.kernels.knn_kernel`; ``int8=False`` forces float32), else
    float32. A SearchBank is returned as it is."""
    if isinstance(bank, SearchBank):
        return bank
    values = np.asarray(bank)
    values = values.reshape(len(values), -1)
    if int8 is None:  # the machine's choice, asked only for an 8-bit bank
        int8 = values.dtype == np.uint8 and hasattr(torch, "_int_mm") and kernels.knn_kernel().value == "int8"
    levels = bool(int8) and values.dtype == np.uint8
    rows = _int8_levels(values) if levels else _as_float(values)
    return SearchBank(values, rows, _row_norms(rows), levels)


@torch.no_grad()
def kneighbors(bank, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               chunk: int = 1024, bank_chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest bank rows of each query: distances (N, k) float64 ascending and indices (N, k) int64.

    Between 8-bit images (a uint8 bank, queries on the 8-bit grid) where the int8 kernel is chosen, one matrix
    product of int8 levels per chunk gives exact squared level distances (eq. K2), and they are the answer. Otherwise
    fp32 products (eq. K0) give candidates, and the k nearest of them are re-ranked with distances summed in float64
    from the original values (exact to float64 rounding, and the same whatever the batch).

    Args:
        bank: (M, D) reference points, or a :class:`SearchBank` of them (:func:`prepare`: made once, reused);
            uint8 rows are read as levels / 255 (the raw-pixel bank), others as float32.
        queries: (N, D) or (N, C, H, W) points on the same scale as ``bank`` (already in [0, 1] for a uint8 bank).
        k: Neighbours per query, 1 ≤ k ≤ M (M − 1 with ``exclude``).
        exclude: (N,) a bank row to skip per query (the query itself, for leave-one-out values), or None.
        chunk, bank_chunk: Queries and bank rows per matrix product (memory: chunk × bank_chunk values).
    """
    queries = np.asarray(queries).reshape(len(queries), -1)
    space = prepare(bank)
    if queries.shape[1] != space.values.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} values each, the bank {space.values.shape[1]}")
    need = k + (exclude is not None)
    if not 1 <= k or len(space) < need:
        raise ValueError(f"the k-NN needs at least {need} reference images, got {len(space)} (k = {k})")
    q, space = _search_space(space, queries)
    dist = np.empty((len(q), k), np.float64)
    index = np.empty((len(q), k), np.int64)
    for start in range(0, len(q), chunk):
        stop = min(start + chunk, len(q))
        if space.levels:  # exact already: squared level distances, 255² times those on the [0, 1] scale
            best_d, best_i = _chunk_topk(q[start:stop], space.rows, space.sq, need, bank_chunk, level_distances)
            best_d = best_d.double() / 255.0 ** 2
        else:
            _, best_i = _chunk_topk(q[start:stop], space.rows, space.sq, min(need + SPARE, len(space)), bank_chunk)
            best_d, best_i = _exact(queries[start:stop], space.values, best_i, need)
        if exclude is not None:
            best_d, best_i = _drop(best_d, best_i, torch.as_tensor(np.asarray(exclude[start:stop])), k)
        dist[start:stop], index[start:stop] = best_d.sqrt().numpy(), best_i.numpy()
    return dist, index


def _search_space(space: SearchBank, queries: np.ndarray) -> tuple[torch.Tensor, SearchBank]:
    """(queries, bank) of the candidate search: int8 levels (eq. K2) when the bank is prepared as levels and the
    queries lie on the 8-bit grid, else fp32 on the [0, 1] scale (eq. K0; an int8 bank is made float for it)."""
    if space.levels:
        levels = _grid_levels(queries)
        if levels is not None:
            return _int8_levels(levels), space
        space = prepare(space.values, int8=False)
    return torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)), space


def _grid_levels(queries: np.ndarray) -> np.ndarray | None:
    """Queries in [0, 1] as uint8 levels when each lies within 1e-3 of a level (float32 u / 255 is not exactly on
    the grid), else None."""
    levels = np.asarray(queries, dtype=np.float32) * 255.0
    rounded = np.rint(levels)
    if not levels.size or np.abs(levels - rounded).max() >= 1e-3 or rounded.min() < 0 or rounded.max() > 255:
        return None
    return rounded.astype(np.uint8)


def _int8_levels(levels: np.ndarray) -> torch.Tensor:
    """uint8 levels (N, ...) as (N, D) int8 levels − 128 (u XOR 0x80 read as int8 is u − 128)."""
    flat = np.ascontiguousarray(levels).reshape(len(levels), -1)
    return torch.from_numpy(np.bitwise_xor(flat, np.uint8(0x80)).view(np.int8))


def _row_norms(b: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """‖b‖² of each row: int32 for int8 levels, else in b's dtype; (M,). Computed ``rows`` rows at a time, so the
    temporaries are a slice's, not the bank's (an int32 copy of a 50,000-image CIFAR-10 bank is 600 MB)."""
    out = torch.empty(len(b), dtype=torch.int32 if b.dtype == torch.int8 else b.dtype)
    for start in range(0, len(b), rows):
        part = b[start:start + rows]
        if b.dtype == torch.int8:
            out[start:start + rows] = part.int().square_().sum(1, dtype=torch.int32)
        else:
            out[start:start + rows] = (part * part).sum(1)
    return out


def _chunk_topk(q, b, b_sq, k, bank_chunk, distances=squared_distances):
    """k smallest squared distances (n, k) and their bank rows over the bank in slices, ascending."""
    best_d = best_i = None
    for start in range(0, len(b), bank_chunk):
        d2 = distances(q, b[start:start + bank_chunk], b_sq[start:start + bank_chunk])
        d, i = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
        i += start
        if best_d is not None:
            d, order = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False)
            i = torch.cat([best_i, i], 1).gather(1, order)
        best_d, best_i = d, i
    return best_d, best_i


def _exact(queries: np.ndarray, bank: np.ndarray, candidates: torch.Tensor, k: int):
    """The k nearest of each query's candidate rows by squared distances summed in float64 from the differences
    of the original values (no cancellation): (n, k) float64 ascending and their rows. One candidate column at a
    time: memory n × D float64, not n × candidates × D."""
    flat = np.asarray(bank).reshape(len(bank), -1)
    scale = 255.0 if flat.dtype == np.uint8 else 1.0
    q = torch.from_numpy(np.asarray(queries, dtype=np.float64))
    d2 = torch.empty(candidates.shape, dtype=torch.float64)
    for j, rows in enumerate(candidates.T.numpy()):
        d2[:, j] = (q - torch.from_numpy(flat[rows].astype(np.float64)).div_(scale)).square_().sum(1)
    d2, order = d2.topk(k, dim=1, largest=False)
    return d2, candidates.gather(1, order)


def _drop(d, i, exclude, k):
    """Remove the excluded row from each query's k+1 neighbours (or the last one when it is absent)."""
    keep = i != exclude[:, None]
    keep[keep.sum(1) > k, -1] = False
    return d[keep].view(len(d), k), i[keep].view(len(i), k)


def _as_float(bank: np.ndarray) -> torch.Tensor:
    bank = np.asarray(bank)
    flat = bank.reshape(len(bank), -1)
    if flat.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(flat)).float().div_(255.0)
    return torch.as_tensor(np.ascontiguousarray(flat, dtype=np.float32))
