"""One evaluation for every method: score the in-distribution test set and each OOD set, metrics, outputs.

It works on anything with ``statistic_values(images_or_loader, key)`` and ``score_values(values)`` (a fitted
:class:`~dgmood.methods.image_detector.ImageDetector`), so it never imports a model. The in-distribution
test set is the positive class (METHODS §4).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["Evaluation", "check_sets", "evaluate_detectors", "write_evaluation"]


@dataclass
class Evaluation:
    """What :func:`evaluate_detectors` returns.

    Attributes:
        in_name: The in-distribution test set's name.
        results: method → OOD name → metric → value.
        scores: method → {"in": (N,), "ood": {name: (M,)}}, higher = more in-distribution.
        values: method → set name → statistic → raw values (N,) or (N, K).
        seconds: method → seconds of scoring (statistics cached before count as free).
        loaders: set name → zero-argument loader of its images (cached: the images are read once).
    """

    in_name: str
    results: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    loaders: dict = field(default_factory=dict)

    @property
    def ood_names(self) -> list[str]:
        first = next(iter(self.scores.values()), {"ood": {}})
        return list(first["ood"])


def check_sets(in_name: str, ood_names) -> None:
    """The one guard of every evaluation, before anything is fitted: an in-distribution test set and at least one
    OOD set are named (ValueError with a one-line message that says which option to pass)."""
    if not in_name:
        raise ValueError("no in-distribution test set known for this run; name one with --in SPEC")
    if not ood_names:
        raise ValueError("no OOD set given; name at least one with --ood SPEC")


def evaluate_detectors(detectors: Mapping[str, object], in_set: tuple[str, Callable[[], np.ndarray]],
                       ood_sets: Mapping[str, Callable[[], np.ndarray]]) -> Evaluation:
    """Scores and metrics of every detector on the in-distribution test set and each OOD set.

    Args:
        detectors: name → fitted detector (see the module docstring).
        in_set: (name, zero-argument image loader) of the in-distribution test set; the name is the cache key.
        ood_sets: name → image loader of each OOD set.
    """
    from dgmood.evaluation.metrics import evaluate

    in_name, in_loader = in_set
    check_sets(in_name, ood_sets)
    loaders = {in_name: functools.cache(in_loader), **{k: functools.cache(v) for k, v in ood_sets.items()}}
    ev = Evaluation(in_name, loaders=loaders)
    for method, det in detectors.items():
        start = time.perf_counter()
        values = {name: det.statistic_values(loader, name) for name, loader in loaders.items()}
        scores = {name: det.score_values(v) for name, v in values.items()}
        ev.seconds[method] = time.perf_counter() - start
        ev.values[method] = values
        ev.scores[method] = {"in": scores[in_name], "ood": {k: scores[k] for k in ood_sets}}
        ev.results[method] = {k: evaluate(scores[in_name], scores[k]) for k in ood_sets}
    return ev


def write_evaluation(directory: Path, ev: Evaluation, context: Mapping, title: str, main: str,
                     extra: Mapping | None = None, galleries: Sequence = (), plots: Mapping | None = None) -> str:
    """metrics.json/.csv, ROC curves, the score histograms of method ``main``, report.md, report.html and
    evaluation.json in ``directory``: the one output step of every evaluation; returns the text metrics table.

    Args:
        directory: Output folder.
        ev: The evaluation.
        context: Label → value lines of the report's context table.
        title: The report's title.
        main: The method whose score histograms are drawn.
        extra: More JSON for evaluation.json.
        galleries: report.html's image galleries (:data:`dgmood.evaluation.html_report.Gallery`).
        plots: More figures of the method (caption → PNG path), shown after the ROC curves and histograms.
    """
    from dgmood.evaluation import report
    from dgmood.utils.files import write_json

    directory = Path(directory)
    rows = report.metrics_table(ev.results)
    report.write_metrics(directory, ev.results)
    write_json(directory / "evaluation.json", {"in": ev.in_name, "ood": ev.ood_names, "methods": list(ev.results),
                                                **dict(extra or {})})
    entry = ev.scores[main]
    figures = {
        "ROC curves per OOD set": report.plot_roc(ev.scores, directory / "plots" / "roc.png"),
        f"Score of {main}, in-distribution vs each OOD set": report.plot_score_histograms(
            entry["in"], entry["ood"], directory / "plots" / "scores.png", label=f"{main} score"),
        **dict(plots or {}),
    }
    report.write_report(directory, rows, figures, context, title=title, galleries=galleries)
    return report.format_table(rows, "text")

