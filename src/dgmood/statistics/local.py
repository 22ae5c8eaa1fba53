"""Local evidence: how anomalous an image's most anomalous window is (issue 28).

The other statistics summarise the whole image (a norm over all pixels, a compressed size, one distance), so a
defect on 5 % of it (a scratch, a stain, a pasted patch, a missing part) moves each of them a little. This one
scores the image by its worst region, as image anomaly tools (PatchCore, PaDiM) do, from the per-pixel evidence the
anomaly maps already use:

1. z_l(x)_hw = (log a_l(x)_hw − μ_l,hw) / ς_l,hw, the standardised log score norm of each pixel at each σ_l
   (eqs. M1–M2, moments from training images);
2. m(x)_hw = (1/L) Σ_l z_l(x)_hw, the anomaly map (eq. M3);
3. the peak window mean of its magnitude (eq. L1), per window side w, over w × w windows W:

       P_w(x) = max_W | (1/w²) Σ_{hw ∈ W} m(x)_hw |.

   Averaging before the magnitude keeps single pixels' noise out (one pixel's log norm has a heavy tail); the
   magnitude counts both directions (noise raises the score norms, a blanked region of texture lowers them).

Window sides are fractions of the image's shorter side (1/7 and 2/7: 4 and 8 pixels at 28 × 28, 5 and 9 at
32 × 32). The passes are the combined detector's score-norm passes (shared, :attr:`shared_sigmas`): no extra network
time per image when both run.
"""

from __future__ import annotations

import numpy as np

from dgmood.statistics.base import register
from dgmood.statistics.field import ScoreFieldStatistic
from dgmood.statistics.maps import standardised_map

__all__ = ["LocalField", "peak_window_mean", "window_sides"]


def window_sides(height: int, width: int, fractions=(1 / 7, 2 / 7)) -> list[int]:
    """Window sides in pixels: each fraction of the shorter side, rounded, at least 2 and at most that side."""
    short = min(height, width)
    return [int(min(short, max(2, round(f * short)))) for f in fractions]


def peak_window_mean(energy: np.ndarray, side: int) -> np.ndarray:
    """The largest mean of ``energy`` (N, H, W) over ``side`` × ``side`` windows (every position, stride 1); (N,)
    float64, by a summed-area table."""
    e = np.asarray(energy, dtype=np.float64)
    table = np.pad(e.cumsum(axis=1).cumsum(axis=2), ((0, 0), (1, 0), (1, 0)))
    s = side
    sums = table[:, s:, s:] - table[:, :-s, s:] - table[:, s:, :-s] + table[:, :-s, :-s]
    return sums.reshape(len(e), -1).max(axis=1) / (s * s)


@register
class LocalField(ScoreFieldStatistic):
    """Eq. L1 at each window side: (N, K), the peak window magnitude of the anomaly map of the score field.

    Args:
        sigmas: Noise levels of the field (the combined detector passes its score-norm levels, so the passes are
            shared).
        fractions: Window sides as fractions of the image's shorter side.
        max_fit, min_std, batch_size: As :class:`~dgmood.statistics.field.ScoreFieldStatistic` (the batch size the
            score norms' own, for shared passes).
    """

    name = "local"

    def __init__(self, sigmas=(1.0, 0.1, 0.01), fractions=(1 / 7, 2 / 7), max_fit=5000, min_std=0.1, batch_size=500):
        super().__init__(sigmas, max_fit, min_std, batch_size)
        self.fractions = tuple(float(f) for f in fractions)

    @property
    def shared_sigmas(self) -> tuple[float, ...]:
        return self.sigmas

    def compute(self, model, images, device="cpu", progress=False):
        m = standardised_map(self._field(model, images, device), self.mean_, self.std_).astype(np.float64)
        sides = window_sides(*m.shape[1:], self.fractions)
        return np.stack([np.maximum(peak_window_mean(m, s), peak_window_mean(-m, s)) for s in sides], axis=1)

    def columns(self, n_columns: int) -> list[str]:
        return [f"local@window={f:.3g}" for f in self.fractions]
