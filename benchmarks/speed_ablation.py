"""What each cheaper setting of the combined detector costs in quality and saves in time (issue 11).

Usage: ``python benchmarks/speed_ablation.py --run runs/demo --variant base='{}' \
--variant recon1='{"reconstruction_steps": 1}' [--n 2000] [--threads 2]``

Each variant is the combined detector with some :class:`~dgmood.methods.recipes.MethodConfig` fields overridden
(JSON), fitted on the run's training images only (never saved over the run's detector). Sets: the in-distribution
test images, the other dataset, uniform / Gaussian / constant noise, and three shifts of the in-distribution test
images (inverted, vertically flipped, rotated by 90°: OOD checks made from in-distribution data). Statistics are
cached in the run, so variants share what they have in common. Prints a markdown table of AUROC (FPR95 in
brackets) per set and the uncached milliseconds per image of each variant's statistics on 1,000 test images;
writes ``OUT/ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import checks  # noqa: E402
from bench import SHIFTS  # noqa: E402
from speed import statistic_ms as ms_per_image  # noqa: E402

from dgmood.app.runs import Run  # noqa: E402
from dgmood.data import datasets  # noqa: E402
from dgmood.evaluation.evaluate import evaluate_detectors  # noqa: E402
from dgmood.methods.recipes import build_detector  # noqa: E402


def _translate(x: np.ndarray, d: int = 3) -> np.ndarray:
    """Images moved d pixels down and right, the uncovered border black."""
    out = np.zeros_like(x)
    out[..., d:, d:] = x[..., :-d, :-d]
    return out


def _blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    from dgmood.statistics.maps import smoothed_map

    return np.clip(smoothed_map(x.reshape(-1, *x.shape[-2:]), sigma), 0, 1).reshape(x.shape).astype(np.float32)


def _noisy(x: np.ndarray, sigma: float = 0.05) -> np.ndarray:
    """Images with Gaussian pixel noise of ``sigma`` (pixel scale, seeded), clipped to [0, 1]."""
    rng = np.random.default_rng(0)
    return np.clip(x + sigma * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


def _low_contrast(x: np.ndarray, factor: float = 0.7) -> np.ndarray:
    """Images with their contrast scaled by ``factor`` around each image's mean."""
    mean = x.mean(axis=(-2, -1), keepdims=True)
    return np.clip(mean + factor * (x - mean), 0, 1).astype(np.float32)


def _occluded(x: np.ndarray, size: int = 8) -> np.ndarray:
    """Images with a mid-grey ``size`` × ``size`` square at a seeded random place."""
    out = x.copy()
    rng = np.random.default_rng(0)
    h, w = x.shape[-2:]
    for img, top, left in zip(out, rng.integers(0, h - size + 1, len(x)), rng.integers(0, w - size + 1, len(x))):
        img[..., top:top + size, left:left + size] = 0.5
    return out


OTHER_SHIFTS = {"noise": _noisy, "contrast": _low_contrast, "occlude": _occluded}
"""Shifts of another kind than geometry (``--other-shifts``): Gaussian pixel noise σ = 0.05, contrast × 0.7, an
8 × 8 mid-grey square; checks of what a change made for the orientation checks costs elsewhere."""

MORE_SHIFTS = {
    "hflip": lambda x: np.ascontiguousarray(x[..., ::-1]),
    "rot180": lambda x: np.ascontiguousarray(np.rot90(x, 2, axes=(2, 3))),
    "rot270": lambda x: np.ascontiguousarray(np.rot90(x, 3, axes=(2, 3))),
    "transpose": lambda x: np.ascontiguousarray(np.swapaxes(x, 2, 3)),
    "translate": _translate,
    "blur": _blur,
}
"""More shifts of the in-distribution test images (``--more-shifts``), beyond bench's three: the other orientations,
a 3-pixel translation and a 1-pixel Gaussian blur (checks that no visible OOD set chose)."""


def defect_loaders(run: Run, in_spec: str) -> dict:
    """The local defect checks of ``benchmarks/checks.py`` on the test images (name = cache key): noise, blank and
    CutPaste squares of 4, 6 and 8 pixels (CutPaste donors: training images of another class) and a scratch."""
    from dgmood.data.datasets import load_labels

    donors = (load_labels(in_spec, run.data_dir), run.images(run.config.data),
              load_labels(run.config.data, run.data_dir))
    made = checks.defect_checks(donors=donors)
    return {f"{name}({in_spec})": (lambda f=f: f(run.images(in_spec))) for name, f in made.items()}


def sets(run: Run, n: int, more: bool = False, other_kinds: bool = False, defects: bool = False
         ) -> tuple[str, dict]:
    """In-distribution test spec and OOD loaders (name = cache key)."""
    in_spec = datasets.head_spec(run.config.in_test, n)
    other = "mnist:test" if "fashion" in run.config.data else "fashion-mnist:test"
    loaders = {s: (lambda s=s: run.images(s)) for s in [f"{other}[:{n}]", "uniform[:500]", "gaussian[:500]",
                                                         "constant[:500]"]}
    shifts = SHIFTS | (MORE_SHIFTS if more else {}) | (OTHER_SHIFTS if other_kinds else {})
    loaders |= {f"{name}({in_spec})": (lambda f=f: f(run.images(in_spec))) for name, f in shifts.items()}
    return in_spec, loaders | (defect_loaders(run, in_spec) if defects else {})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON overrides of MethodConfig")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-speed"))
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--more-shifts", action="store_true", help="also the shifts of MORE_SHIFTS")
    parser.add_argument("--other-shifts", action="store_true", help="also the shifts of OTHER_SHIFTS")
    parser.add_argument("--defects", action="store_true", help="also the local defects of checks.defect_checks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(args.run, progress=True)
    in_spec, loaders = sets(run, args.n, args.more_shifts, args.other_shifts, args.defects)
    probe = run.images(f"{in_spec.split('[')[0]}[:1000]")
    table, out = [], {}
    for item in args.variant or ["base={}"]:
        name, _, overrides = item.partition("=")
        config = run.method_config(**json.loads(overrides or "{}"))
        det = build_detector("combined", run.model, "score", config, run.device, run.cache, True)
        det.fit(run.images(run.config.data), fit_n=run.config.features.fit_n, key=run.fit_spec())
        ev = evaluate_detectors({name: det}, (in_spec, lambda: run.images(in_spec)), loaders)
        ms = {} if args.no_timing else ms_per_image(det, probe)
        out[name] = {"overrides": json.loads(overrides or "{}"), "results": ev.results[name], "ms": ms}
        cells = [f"{r['auroc']:.4f} ({100 * r['fpr_at_95_tpr']:.1f})" for r in ev.results[name].values()]
        table.append(f"| {name} | " + " | ".join(cells) + f" | {sum(ms.values()):.2f} |")
        print(table[-1], flush=True)
    header = "| variant | " + " | ".join(loaders) + " | ms/image |"
    print("\n".join([header, "|" + "---|" * (len(loaders) + 2), *table]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
