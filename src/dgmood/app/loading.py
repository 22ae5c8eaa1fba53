"""``dgmood.load``: a saved detector from a run directory (its default method, or one by name) or a detector folder.

A run keeps each fitted method in ``RUN/detectors/METHOD/`` (:class:`~dgmood.methods.image_detector.ImageDetector`
folders); ``RUN/config.json`` names the default method (``combined`` for a score model). A detector folder can
be copied anywhere and loaded on its own::

    import dgmood
    det = dgmood.load("runs/demo")                       # the run's default method
    det = dgmood.load("runs/demo", "msma-knn")           # another fitted method
    det = dgmood.load("shipped/combined")                # a copied detector folder
    det.score(images)     # (N,) float, higher = more in-distribution
    det.predict(images)   # (N,) int, +1 in-distribution / -1 OOD
"""

from __future__ import annotations

import json
from pathlib import Path

from dgmood.utils.errors import CheckpointError

__all__ = ["load"]


def _default_method(run: Path) -> str:
    path = run / "config.json"
    try:
        config = json.loads(path.read_text())
        return str(config.get("method") or ("dual-threshold" if config["net"].get("kind") == "flow" else "combined"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is unreadable or corrupt ({err}); restore it or rerun `dgmood run`") from err


def load(path, method: str | None = None, device="cpu"):
    """The saved detector at ``path``: a detector folder (has ``detector.json``), or a run directory's
    ``detectors/METHOD`` (default: the run's method).

    Raises:
        CheckpointError: nothing fitted there, or missing / damaged files (one line saying what to do).
        ValueError: an unknown method name.
    """
    from dgmood.app.runs import resolve_device
    from dgmood.methods.image_detector import ImageDetector
    from dgmood.methods.recipes import resolve_method

    directory = Path(path)
    device = resolve_device(str(device))
    if (directory / "detector.json").is_file() and not (directory / "config.json").is_file():
        return ImageDetector.load(directory, device)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a dgmood run or detector folder (no config.json or detector.json);"
                              " give the --run directory of a fitted run")
    name = resolve_method(method or _default_method(directory)).name
    folder = directory / "detectors" / name
    if not (folder / "detector.json").is_file():
        fitted = sorted(p.name for p in (directory / "detectors").glob("*") if (p / "detector.json").is_file())
        also = f" (fitted: {', '.join(fitted)})" if fitted else ""
        raise CheckpointError(f"no fitted {name} detector in {directory}{also}; "
                              f"run `dgmood fit --run {directory} --method {name}`")
    return ImageDetector.load(folder, device)
