"""``dgmood predict``: verdicts for new images, one CSV row per image, with reasons and (optionally) maps."""

from __future__ import annotations

import csv
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dgmood.data.datasets import DataError

__all__ = ["CHUNK", "MapWriter", "Summary", "predict"]

CHUNK = 1024
"""Images read, decoded and explained at a time: bounded memory for any number of images."""


@dataclass
class Summary:
    """What :func:`predict` did: images scored, of them flagged, the files skipped as bad (source, reason), and
    per set the entries of its folder or archive that are not images (``hidden`` / ``not an image`` → count)."""

    n: int = 0
    flagged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: dict[str, dict[str, int]] = field(default_factory=dict)


def _check_specs(specs: list[str], data_dir) -> tuple[dict[str, dict[str, int]], int | None]:
    """Every spec parsed and every folder/archive listed before anything is scored (a typo in the last set stops
    the run at once); returns what each folder or archive holds besides images, and the number of images when
    every set is a folder or archive (else None)."""
    from dgmood.data.datasets import image_count, open_collection, parse_spec

    ignored, total = {}, 0
    for spec in specs:
        parse_spec(spec)
        collection = open_collection(spec, data_dir)
        if collection is not None and collection.skipped:
            ignored[spec] = collection.skipped
        total = None if collection is None or total is None else total + image_count(spec, collection)
    return ignored, total


class MapWriter:
    """``DIR/maps.npy`` (float32 (N, H, W), higher = more anomalous, in the order of the CSV's scored rows) and one
    PNG tile per image
    (image | map overlay | nearest training image, score, verdict, reasons), built in a hidden folder beside
    ``DIR`` and put in place only when every image is done: an interrupted run leaves the old ``DIR`` or none.

    Raises:
        DataError: ``DIR`` exists, is not empty and holds no ``maps.npy`` (not an earlier maps folder).
    """

    def __init__(self, directory: Path, image_hw: tuple[int, int]):
        self.directory = Path(directory)
        if self.directory.exists() and (not self.directory.is_dir() or (
                any(self.directory.iterdir()) and not (self.directory / "maps.npy").is_file())):
            raise DataError(f"--maps {self.directory} exists and is not an earlier maps folder; name a new folder")
        self.tmp = self.directory.with_name(f".{self.directory.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        (self.tmp / ".parts").mkdir(parents=True)
        self.image_hw, self.row, self.parts = tuple(image_hw), 0, []

    def add(self, detector, images: np.ndarray, explanation, sources: list[str]) -> None:
        """Write one chunk: its maps and tiles (rows continue from the last chunk)."""
        from dgmood.methods.explain import verdict_tiles

        n = len(images)
        maps = explanation.maps if explanation.maps is not None else np.full((n, *self.image_hw), np.nan, np.float32)
        part = self.tmp / ".parts" / f"{len(self.parts):06d}.npy"
        np.save(part, np.asarray(maps, np.float32))
        self.parts.append(part)
        for i, (png, _) in enumerate(verdict_tiles(detector, images, explanation)):
            (self.tmp / f"{self.row + i:06d}_{_safe_name(sources[i])}.png").write_bytes(png)
        self.row += n

    def finish(self) -> Path:
        maps = np.lib.format.open_memmap(self.tmp / "maps.npy", mode="w+", dtype=np.float32,
                                         shape=(self.row, *self.image_hw))
        start = 0
        for part in self.parts:
            block = np.load(part)
            maps[start:start + len(block)] = block
            start += len(block)
        maps.flush()
        del maps
        shutil.rmtree(self.tmp / ".parts")
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


def _rows(detector, spec: str, chunk, e) -> list[dict]:
    """CSV rows of one chunk: its scored images and its skipped files, in set order."""
    columns = {}
    for stat in detector.statistics:
        v = np.asarray(e.values[stat.name], dtype=np.float64).reshape(len(e.scores), -1)
        columns.update({name: v[:, j] for j, name in enumerate(stat.columns(v.shape[1]))})
    z = {f"z:{name}": e.deviations[:, j] for j, name in enumerate(detector.columns_)}
    rows = [{"source": chunk.sources[i], "set": spec, "index": int(chunk.index[i]), "height": int(chunk.sizes[i, 0]),
             "width": int(chunk.sizes[i, 1]), "score": float(e.scores[i]), "verdict": int(e.verdicts[i]),
             "threshold": detector.threshold, "reasons": e.reasons[i],
             **{k: float(c[i]) for k, c in columns.items()}, **{k: float(c[i]) for k, c in z.items()}, "error": ""}
            for i in range(len(e.scores))]
    rows += [{"source": source, "set": spec, "index": index, "error": reason} for index, source, reason in chunk.bad]
    return sorted(rows, key=lambda r: r["index"])


def predict(detector, specs: list[str], out: Path, data_dir=None, maps_dir: Path | None = None,
            skip_bad: bool = False, chunk: int = CHUNK) -> Summary:
    """Write one CSV row per image of every spec to ``out``.

    Columns: source (a file's path relative to its folder or archive, else SPEC#INDEX), set, index, height and
    width of the original image, score, verdict (+1 / -1), threshold, reasons, each statistic's raw values, each
    feature column's deviation from training (``z:COLUMN``, training standard deviations), and error (why a
    skipped file was skipped). Sets are streamed in chunks of ``chunk`` images, decoded ahead of the network
    (:func:`dgmood.data.datasets.iter_chunks`), so memory stays bounded by a chunk; images are brought to the
    model by the detector's resize policy. Rows go to a temporary file renamed over ``out`` at the end: a crash
    or a bad file leaves no half CSV.

    Args:
        detector: A fitted :class:`~dgmood.methods.image_detector.ImageDetector`.
        specs: Dataset specs.
        out: The CSV's path.
        data_dir: Folder of the named sets.
        maps_dir: Also write anomaly maps and tiles there (:class:`MapWriter`).
        skip_bad: Score the other images when a file cannot be used, and list it (else stop at it).
        chunk: Images per chunk.

    Raises:
        DataError: a set cannot be read, or (without ``skip_bad``) an image in it; nothing is written then.
    """
    from dgmood.data.datasets import iter_chunks
    from dgmood.utils.files import atomic_write

    from dgmood.utils.progress import progress_bar

    ignored, total = _check_specs(specs, data_dir)
    summary = Summary(ignored=ignored)
    writer = None if maps_dir is None else MapWriter(maps_dir, detector.image_shape[1:])
    bar = progress_bar(total=total, desc="predict", unit="img", enabled=detector.progress)
    progress, detector.progress = detector.progress, False  # one bar for the whole run, not one per chunk

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            table, waiting = None, []
            for spec in specs:
                for part in iter_chunks(spec, detector.image_shape, data_dir, resize=detector.resize, chunk=chunk,
                                        skip_bad=skip_bad):
                    e = detector.explain(part.images, maps=writer is not None) if len(part.images) else None
                    rows = _rows(detector, spec, part, e) if e is not None else \
                        [{"source": s, "set": spec, "index": i, "error": r} for i, s, r in part.bad]
                    if table is None and e is not None:
                        first = next(r for r in rows if not r["error"])
                        table = csv.DictWriter(f, fieldnames=list(first), restval="", lineterminator="\n")
                        table.writeheader()
                        table.writerows(waiting)
                    if table is None:
                        waiting += rows
                    else:
                        table.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                                        for r in rows)
                    summary.n += len(part.images)
                    summary.flagged += 0 if e is None else int(np.sum(e.verdicts == -1))
                    summary.skipped += [(s, r) for _, s, r in part.bad]
                    bar.update(len(part.images) + len(part.bad))
                    if writer is not None and e is not None:
                        writer.add(detector, part.images, e, part.sources)
            if table is None:  # nothing could be scored: the skipped files alone
                table = csv.DictWriter(f, fieldnames=["source", "set", "index", "error"], lineterminator="\n")
                table.writeheader()
                table.writerows(waiting)

    try:
        atomic_write(Path(out), write)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
        detector.progress = progress
    if writer is not None:
        writer.finish()
    return summary
