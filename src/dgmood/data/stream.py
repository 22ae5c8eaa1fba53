"""Chunked image streams: files are decoded by worker threads ahead of the consumer, so memory is bounded by a
chunk (not the set) and decoding overlaps whatever the consumer does with the previous chunk (a network pass).

Pillow releases the GIL while it decodes and resamples, so threads decode in parallel without the start-up
and pickling cost of worker processes (measured in ``benchmarks/stream.py``).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dgmood.data.collection import Collection
from dgmood.data.images import BadImage, ImagePolicy, decode

__all__ = ["DEFAULT_CHUNK", "DEFAULT_KIND", "GROUP", "Chunk", "decode_kind", "decode_workers", "stream_collection"]

DEFAULT_CHUNK = 1024
"""Images per chunk."""

GROUP = 32
"""Images per decoding task at most."""

DEFAULT_KIND = "threads"
"""How images are decoded unless ``$DGMOOD_DECODE`` says otherwise (see the module docstring)."""


def decode_workers() -> int:
    """Decoding workers: ``$DGMOOD_DECODE_WORKERS``, else the CPU count (at most 8)."""
    value = os.environ.get("DGMOOD_DECODE_WORKERS", "")
    return max(1, int(value)) if value.isdigit() else max(1, min(8, os.cpu_count() or 1))


def decode_kind() -> str:
    """``threads`` or ``processes``: ``$DGMOOD_DECODE``, else :data:`DEFAULT_KIND`."""
    value = os.environ.get("DGMOOD_DECODE", "").strip().lower()
    return value if value in ("threads", "processes") else DEFAULT_KIND


@dataclass
class Chunk:
    """Consecutive images of a set.

    Attributes:
        images: (n, C, H, W) float32 in [0, 1], brought to the model by the policy.
        sources: each image's name (a file's relative path, an archive member, or ``SPEC#INDEX``).
        sizes: (n, 2) int64 (height, width) of each original, in pixels.
        index: each image's position in the set (after its slice), (n,) int64.
        bad: images left out of ``images`` because they cannot be used: (position, source, reason).
    """

    images: np.ndarray
    sources: list[str]
    sizes: np.ndarray
    index: np.ndarray
    bad: list[tuple[int, str, str]]


def _assemble(results: list[tuple[int, str, object]], shape: tuple[int, int, int], skip_bad: bool) -> Chunk:
    """A chunk from (position, source, (uint8 image, size) or BadImage); the first BadImage raises unless
    ``skip_bad``."""
    good = [(i, s, r) for i, s, r in results if not isinstance(r, BadImage)]
    bad = [(i, s, r.reason) for i, s, r in results if isinstance(r, BadImage)]
    if bad and not skip_bad:
        raise next(r for _, _, r in results if isinstance(r, BadImage))
    images = np.empty((len(good), *shape), np.float32)
    for row, (_, _, (arr, _)) in enumerate(good):
        np.divide(arr, np.float32(255.0), out=images[row], dtype=np.float32)
    sizes = np.array([r[1] for _, _, r in good], np.int64).reshape(len(good), 2)
    return Chunk(images, [s for _, s, _ in good], sizes, np.array([i for i, _, _ in good], np.int64), bad)


def _decode(item: bytes | BadImage, source: str, policy: ImagePolicy):
    """(uint8 image, size) or the BadImage that says why not (never raises for a bad file)."""
    if isinstance(item, BadImage):
        return item
    try:
        return decode(item, source, policy)
    except BadImage as err:
        return err


def _group_size(chunk: int) -> int:
    """Images per decoding task: the largest divisor of ``chunk`` up to :data:`GROUP` (chunks stay exact)."""
    return max(d for d in range(1, min(GROUP, chunk) + 1) if chunk % d == 0)


def _decode_group(items: list, sources: list[str], policy: ImagePolicy) -> list:
    """:func:`_decode` of several images (one task for a worker: fewer futures, less pickling)."""
    return [_decode(item, source, policy) for item, source in zip(items, sources)]


def _pool(kind: str, workers: int):
    """The executor decoding runs on: threads, or worker processes started by a fork server (they import numpy
    and Pillow, never torch)."""
    if kind == "processes":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["dgmood.data.stream"])
        return ProcessPoolExecutor(workers, mp_context=context)
    return ThreadPoolExecutor(workers, thread_name_prefix="dgmood-decode")


def stream_collection(collection: Collection, policy: ImagePolicy, start: int = 0, stop: int | None = None,
                      chunk: int = DEFAULT_CHUNK, skip_bad: bool = False, workers: int | None = None,
                      kind: str | None = None) -> Iterator[Chunk]:
    """Chunks of members ``start:stop`` of ``collection``, decoded by ``workers`` threads or processes (``kind``,
    default :func:`decode_kind`) up to two chunks ahead of the consumer.

    Raises:
        BadImage: the first image that cannot be used (unless ``skip_bad``: then it is listed in ``Chunk.bad``).
    """
    reader = enumerate(collection.read(start, stop))
    group = _group_size(chunk)
    pending: deque[tuple[list[int], list[str], Future]] = deque()
    queued = [0]
    with _pool(kind or decode_kind(), workers or decode_workers()) as pool:
        def fill() -> None:
            while queued[0] < 2 * chunk:
                taken = list(itertools.islice(reader, group))
                if not taken:
                    return
                index, sources, items = [i for i, _ in taken], [s for _, (s, _) in taken], [b for _, (_, b) in taken]
                pending.append((index, sources, pool.submit(_decode_group, items, sources, policy)))
                queued[0] += len(taken)

        try:
            fill()
            while pending:
                results = []
                while pending and len(results) < chunk:
                    index, sources, future = pending.popleft()
                    queued[0] -= len(index)
                    results += list(zip(index, sources, future.result()))
                fill()
                yield _assemble(results, policy.shape, skip_bad)
        finally:  # stopped early (an error, or the consumer closed us): drop the decodes not yet started
            for _, _, future in pending:
                future.cancel()
