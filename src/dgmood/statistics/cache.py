"""The one entry point to cached statistic values: ``StatisticCache.values(statistic, dataset, images_fn, ...)``.

Values are computed once per (model checksum, statistic, its cache settings, dataset name) and stored as
``.npz`` files (values + JSON provenance, read without pickle). Score norms live in the run's MSMA feature
cache (``RUN/features``, which ``dgmood features`` fills, under torchrun too); every other statistic in
``RUN/lens/STAT/``. A damaged file is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from dgmood.statistics.base import Statistic

__all__ = ["StatisticCache"]


class StatisticCache:
    """Cached values of statistics under one model.

    Args:
        directory: The run directory (``features/`` and ``lens/`` below it).
        model_sha: SHA-256 of the model weights: part of every key.
        batch_size: Images per network call of the score norms.
    """

    def __init__(self, directory: Path, model_sha: str, batch_size: int = 500):
        from dgmood.statistics.lens import StatCache
        from dgmood.statistics.score_norms import FeatureCache

        self.directory, self.model_sha, self.batch_size = Path(directory), model_sha, batch_size
        self.features = FeatureCache(self.directory / "features", model_sha)
        self.lens = StatCache(self.directory / "lens", model_sha)
        self.seconds: dict[str, float] = {}

    def values(self, stat: Statistic, dataset: str, images_fn: Callable[[], np.ndarray], model, device="cpu",
               progress: bool = False, training: bool = False) -> np.ndarray:
        """Values of ``stat`` on ``dataset`` (N,) or (N, K), computed from ``images_fn()`` only on a miss.

        ``training``: the images are the ones ``stat`` was fitted on (its :meth:`~Statistic.compute_training`).
        """
        from dgmood.statistics.score_norms import ScoreNorms

        if isinstance(stat, ScoreNorms):
            fs = self.features.get(dataset, np.asarray(stat.sigmas), images_fn, model, device, stat.batch_size,
                                   progress)
            if "images_per_s" in fs.meta:
                self.seconds.setdefault(stat.name, 1.0 / fs.meta["images_per_s"])
            return fs.values.astype(np.float64)
        settings = stat.cache_settings(training)
        hit = self.lens.load(stat.name, settings, dataset)
        if hit is not None:
            self.seconds.setdefault(stat.name, hit[1].get("seconds_per_image", float("nan")))
            return hit[0]
        import time

        images = images_fn()
        start = time.perf_counter()
        compute = stat.compute_training if training else stat.compute
        values = np.asarray(compute(model, images, device, progress), dtype=np.float64)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).any(axis=tuple(range(1, values.ndim))).sum())
            raise ValueError(f"{stat.name} of {dataset} is not finite for {bad} images; the model may have diverged")
        seconds = (time.perf_counter() - start) / max(1, len(values))
        self.seconds.setdefault(stat.name, seconds)
        self.lens.save(stat.name, settings, dataset, values, seconds_per_image=seconds, n=len(values))
        return values
