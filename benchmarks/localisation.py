"""Do the anomaly maps find a pasted anomaly? (issue 12)

Usage: ``python benchmarks/localisation.py --run runs/demo [--n 500] [--size 6] [--threads 2]``

Pastes one ``size`` × ``size`` patch (uniform noise, and separately a bright square) at a random place into each
of ``n`` in-distribution test images and prints the pixel-level AUROC of map values inside vs outside the patch
for: the run's combined detector's anomaly map, its score-field part alone and per σ level, and the raw-pixel
difference to the nearest training image. Nothing here uses OOD data. Writes OUT/localisation.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dgmood.app.runs import Run  # noqa: E402
from dgmood.evaluation.localisation import paste_patches, pixel_auroc  # noqa: E402
from dgmood.statistics.maps import SMOOTH, difference_map, log_norms, pixel_score_norms, smoothed_map  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Run(args.run, progress=False)
    det = run.image_detector("combined")
    explainer = det.explainer
    if explainer is None:
        raise SystemExit(f"{args.run}'s combined detector has no anomaly map; fit it again with this version")
    x = run.images(run.config.in_test)[:args.n]
    results = {}
    for kind in ("noise", "square"):
        patched, masks = paste_patches(x, args.size, np.random.default_rng(0), kind)
        e = det.explain(patched)
        difference = difference_map(patched, e.nearest)
        raw = copy.copy(explainer)
        raw.smooth = 0.0
        m5, m3 = raw.compute(det.model, patched, nearest=e.nearest), raw.compute(det.model, patched)
        row = {f"anomaly map (eq. M6: M5 smoothed at {explainer.smooth:g} px, the detector's)": pixel_auroc(e.maps, masks),
               "eq. M5 unsmoothed, against the nearest image only": pixel_auroc(m5, masks),
               "its score-field part (eq. M3, unsmoothed)": pixel_auroc(m3, masks),
               "nearest-image difference (eq. M4)": pixel_auroc(difference, masks),
               f"nearest-image difference smoothed at {SMOOTH:g} px": pixel_auroc(smoothed_map(difference, SMOOTH), masks)}
        z = (log_norms(pixel_score_norms(det.model, patched, explainer.sigmas)) - explainer.mean_) / explainer.std_
        row.update({f"score-field map at sigma={s:.4g} only": pixel_auroc(z[:, i], masks)
                    for i, s in enumerate(explainer.sigmas)})
        results[kind] = row
    print(f"pixel AUROC, {args.size}x{args.size} patch in {len(x)} images of {run.config.in_test}")
    print(f"| map | {' | '.join(results)} |\n| --- | {' | '.join('---:' for _ in results)} |")
    for name in results["noise"]:
        print(f"| {name} | {' | '.join(f'{results[k][name]:.4f}' for k in results)} |")
    out = args.out or args.run / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "localisation.json").write_text(json.dumps({"n": len(x), "size": args.size, "results": results}, indent=1))


if __name__ == "__main__":
    main()
