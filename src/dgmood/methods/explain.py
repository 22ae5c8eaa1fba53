"""Explained verdicts as pictures: one tile per image (image, anomaly map, nearest training image, reasons)."""

from __future__ import annotations

import numpy as np

from dgmood.evaluation.tiles import png_bytes, tile

__all__ = ["caption", "galleries", "map_scale", "most_atypical", "panels", "verdict_tiles"]


def map_scale(detector) -> float:
    """The map value drawn brightest: 4 training standard deviations for the score-field map, half the pixel
    range for the nearest-image difference."""
    return 4.0 if detector.explainer is not None else 0.5


def caption(score: float, verdict: int, threshold: float, reason: str) -> list[str]:
    """Caption lines of a tile: verdict and score against the threshold, then one line per reason."""
    head = f"{'in-distribution' if verdict == 1 else 'OOD'}  score {score:.3g} ({'>=' if verdict == 1 else '<'} " \
           f"{threshold:.3g})"
    return [head, *(reason.split("; ") if reason else ["no statistic beyond 2 sd of training"])]


def verdict_tiles(detector, images, explanation=None) -> list[tuple[bytes, str]]:
    """(PNG bytes, caption) per image: what ``report.html`` shows and ``dgmood predict --maps`` writes.

    Args:
        detector: A fitted :class:`~dgmood.methods.image_detector.ImageDetector`.
        images: Images as its ``prepare`` takes them.
        explanation: Its :meth:`explain` of ``images`` when already computed.
    """
    x = detector.prepare(images)
    e = explanation if explanation is not None else detector.explain(x)
    out = []
    for i in range(len(x)):
        lines = caption(float(e.scores[i]), int(e.verdicts[i]), detector.threshold, e.reasons[i])
        picture = tile(x[i], None if e.maps is None else e.maps[i], None if e.nearest is None else e.nearest[i],
                       lines, map_scale(detector))
        out.append((png_bytes(picture), " | ".join(lines)))
    return out


def most_atypical(scores: np.ndarray, n: int, lowest: bool) -> np.ndarray:
    """Indices of the ``n`` lowest (most OOD-looking) or highest (most in-distribution-looking) scores."""
    order = np.argsort(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf), kind="stable")
    return order[:n] if lowest else order[::-1][:n]


def panels(detector) -> str:
    """What a verdict tile of ``detector`` shows, e.g. ``image | anomaly map | nearest training image``."""
    bank = detector.pixel_bank() is not None
    parts = ["image"] + (["anomaly map"] if bank or detector.explainer is not None else []) + (
        ["nearest training image"] if bank else [])
    return " | ".join(parts)


def galleries(detector, ev, method: str, n: int = 16, tiles=None, shows: str = "") -> list:
    """``report.html``'s galleries for one method of an :class:`~dgmood.evaluation.evaluate.Evaluation`: the
    ``n`` most atypical in-distribution test images, then per OOD set the ``n`` most in-distribution-looking.

    Args:
        detector: The method's :class:`~dgmood.methods.image_detector.ImageDetector` (its verdict tiles), or None
            with ``tiles``.
        ev: The evaluation (its scores and image loaders).
        method: The method's name in ``ev``.
        n: Images per gallery.
        tiles: (set name, images, their indices in the set) → [(PNG bytes, caption)]; default the detector's
            :func:`verdict_tiles`.
        shows: What each tile shows (default: :func:`panels` of the detector).
    """
    make = tiles or (lambda name, images, idx: verdict_tiles(detector, images))
    shows = shows or panels(detector)
    entry = ev.scores[method]
    sets = [(ev.in_name, entry["in"], True, f"The {n} in-distribution test images {method} finds most atypical "
             "(lowest scores): false alarms, or odd training-like images.")]
    sets += [(name, s, False, f"The {n} images of {name} that {method} finds most in-distribution (highest "
              "scores): what it could miss.") for name, s in entry["ood"].items()]
    out = []
    for name, scores, lowest, note in sets:
        idx = most_atypical(scores, n, lowest)
        out.append((f"{'Most atypical' if lowest else 'Most in-distribution-looking'}: {name}",
                    f"{note} Each: {shows}.", make(name, ev.loaders[name]()[idx], idx)))
    return out
