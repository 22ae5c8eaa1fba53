"""``dgmood predict``: verdicts for new images, one CSV row per image, with reasons and (optionally) maps."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import numpy as np

from dgmood.data.datasets import DataError

__all__ = ["MapWriter", "predict"]

CHUNK = 2048
"""Images explained at a time: bounded memory for any number of images."""


def _load_all(specs: list[str], shape: tuple[int, int, int], data_dir) -> list[tuple[str, np.ndarray, list[str]]]:
    """Every set's images (checked for the model: size, channels, values) and sources, before anything is scored."""
    from dgmood.data.datasets import image_sources, load_images

    loaded = []
    for spec in specs:
        images = load_images(spec, data_dir, shape=shape)
        loaded.append((spec, images, image_sources(spec, len(images))))
    return loaded


class MapWriter:
    """``DIR/maps.npy`` (float32 (N, H, W), higher = more anomalous, CSV row order) and one PNG tile per image
    (image | map overlay | nearest training image, score, verdict, reasons), built in a hidden folder beside
    ``DIR`` and put in place only when every image is done: an interrupted run leaves the old ``DIR`` or none.

    Raises:
        DataError: ``DIR`` exists, is not empty and holds no ``maps.npy`` (not an earlier maps folder).
    """

    def __init__(self, directory: Path, n_images: int, image_hw: tuple[int, int]):
        self.directory = Path(directory)
        if self.directory.exists() and (not self.directory.is_dir() or (
                any(self.directory.iterdir()) and not (self.directory / "maps.npy").is_file())):
            raise DataError(f"--maps {self.directory} exists and is not an earlier maps folder; name a new folder")
        self.tmp = self.directory.with_name(f".{self.directory.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.maps = np.lib.format.open_memmap(self.tmp / "maps.npy", mode="w+", dtype=np.float32,
                                              shape=(n_images, *image_hw))
        self.row = 0

    def add(self, detector, images: np.ndarray, explanation, sources: list[str]) -> None:
        """Write one chunk: its maps and tiles (rows continue from the last chunk)."""
        from dgmood.methods.explain import verdict_tiles

        n = len(images)
        if explanation.maps is not None:
            self.maps[self.row:self.row + n] = explanation.maps
        else:
            self.maps[self.row:self.row + n] = np.nan
        for i, (png, _) in enumerate(verdict_tiles(detector, images, explanation)):
            (self.tmp / f"{self.row + i:06d}_{_safe_name(sources[i])}.png").write_bytes(png)
        self.row += n

    def finish(self) -> Path:
        self.maps.flush()
        del self.maps
        old = self.directory.with_name(f".{self.directory.name}.old-{os.getpid()}")
        if self.directory.exists():
            self.directory.rename(old)
        self.tmp.rename(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        return self.directory

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _safe_name(source: str) -> str:
    """A file-name-safe short form of an image's source (its file's stem, or SPEC#INDEX)."""
    stem = source if "#" in source else Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[-60:]


def _rows(detector, spec: str, sources: list[str], start: int, e) -> list[dict]:
    columns = {}
    for stat in detector.statistics:
        v = np.asarray(e.values[stat.name], dtype=np.float64).reshape(len(e.scores), -1)
        columns.update({name: v[:, j] for j, name in enumerate(stat.columns(v.shape[1]))})
    z = {f"z:{name}": e.deviations[:, j] for j, name in enumerate(detector.columns_)}
    return [{"source": sources[start + i], "set": spec, "index": start + i, "score": float(e.scores[i]),
             "verdict": int(e.verdicts[i]), "threshold": detector.threshold, "reasons": e.reasons[i],
             **{k: float(c[i]) for k, c in columns.items()}, **{k: float(c[i]) for k, c in z.items()}}
            for i in range(len(e.scores))]


def predict(detector, specs: list[str], out: Path, data_dir=None, maps_dir: Path | None = None) -> tuple[int, int]:
    """Write one CSV row per image of every spec to ``out`` and return (images, flagged).

    Columns: source, set, index, score, verdict, threshold, reasons, each statistic's raw values and each
    feature column's deviation from training (``z:COLUMN``, training standard deviations). Rows are written as
    each chunk of :data:`CHUNK` images is scored, into a temporary file renamed over ``out`` at the end (a crash
    leaves no half CSV), so memory stays bounded by one chunk for any number of images.

    Args:
        detector: A fitted :class:`~dgmood.methods.image_detector.ImageDetector`.
        specs: Dataset specs.
        out: The CSV's path.
        data_dir: Folder of the named sets' IDX files.
        maps_dir: Also write anomaly maps and tiles there (:class:`MapWriter`).

    Raises:
        DataError: a set cannot be read or does not fit the model (nothing is scored or written then).
    """
    from dgmood.utils.files import atomic_write

    loaded = _load_all(specs, detector.image_shape, data_dir)
    writer = None
    if maps_dir is not None:
        writer = MapWriter(maps_dir, sum(len(x) for _, x, _ in loaded), detector.image_shape[1:])
    counts = [0, 0]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            table = None
            for spec, images, sources in loaded:
                for start in range(0, len(images), CHUNK):
                    chunk = images[start:start + CHUNK]
                    e = detector.explain(chunk, maps=writer is not None)
                    rows = _rows(detector, spec, sources, start, e)
                    if table is None:
                        table = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
                        table.writeheader()
                    table.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                                    for r in rows)
                    counts[0] += len(rows)
                    counts[1] += int(np.sum(e.verdicts == -1))
                    if writer is not None:
                        writer.add(detector, chunk, e, sources[start:start + CHUNK])

    try:
        atomic_write(Path(out), write)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.finish()
    return counts[0], counts[1]
