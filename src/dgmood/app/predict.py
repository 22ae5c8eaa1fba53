"""``dgmood predict``: verdicts for new images, one CSV row per image."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

__all__ = ["predict", "write_verdicts"]


def _load_all(specs: list[str], shape: tuple[int, int, int], data_dir) -> list[tuple[str, np.ndarray, list[str]]]:
    """Every set's images (checked for the model: size, channels, values) and sources, before anything is scored."""
    from dgmood.data.datasets import image_sources, load_images

    loaded = []
    for spec in specs:
        images = load_images(spec, data_dir, shape=shape)
        loaded.append((spec, images, image_sources(spec, len(images))))
    return loaded


def predict(detector, specs: list[str], data_dir=None) -> list[dict]:
    """One row per image of every spec: source, set, index, score, verdict, threshold, statistic values.

    Raises:
        DataError: a set cannot be read or does not fit the model (nothing is scored then).
    """
    rows = []
    for spec, images, sources in _load_all(specs, detector.image_shape, data_dir):
        values = detector.statistic_values(images)
        scores = detector.score_values(values)
        columns = {}
        for stat in detector.statistics:
            v = np.asarray(values[stat.name], dtype=np.float64).reshape(len(images), -1)
            columns.update({name: v[:, j] for j, name in enumerate(stat.columns(v.shape[1]))})
        for i, (source, score) in enumerate(zip(sources, scores)):
            verdict = 1 if np.isfinite(score) and score >= detector.threshold else -1
            rows.append({"source": source, "set": spec, "index": i, "score": float(score), "verdict": verdict,
                         "threshold": detector.threshold, **{k: float(c[i]) for k, c in columns.items()}})
    return rows


def write_verdicts(path: Path, rows: list[dict], detector) -> Path:
    """The rows as CSV at ``path``, written atomically (a crash leaves no half file)."""
    from dgmood.utils.files import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
