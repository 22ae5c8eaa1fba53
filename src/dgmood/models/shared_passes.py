"""Forward passes shared between statistics: a pass of the same images at the same σ runs once.

The combined detector's score norms evaluate the network on the clean images at five levels, and its feature
k-NN reads the middle-block activations of the clean images at one of them (σ = 0.129 by default); the
network returns both from one pass (``scaled_score_and_mid``). :class:`SharedPasses` keeps the passes at the
noise levels it is told, keyed by the images' bytes and σ, and hands them out again, so the second statistic
costs no network time (one of ten passes per image, docs/results.md). Passes at other levels, on other images
or with gradients go straight to the network.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

__all__ = ["SharedPasses"]


class SharedPasses:
    """A score network (a :class:`~dgmood.models.network.ScoreNet` or its
    :class:`~dgmood.models.exported.OnnxScoreNet`) whose clean-image passes at ``sigmas`` are computed once.

    Meant for one chunk of images: it keeps every pass it was asked to share, (N, C, H, W) scores and the middle
    block's (N, C_mid, h, w) activations per call, until it is dropped. Callers get copies, so writing into a
    result does not change what the next one reads.

    Args:
        network: Has ``scaled_score_and_mid(x, σ)``; every other attribute (``config``, ...) is read from it.
        sigmas: Noise levels (pixel scale) whose passes are shared; a call matches a level when every image's σ
            equals it to a relative 1e-6.

    Attributes:
        hits: Calls answered from a kept pass.
    """

    def __init__(self, network, sigmas):
        self.network, self.sigmas = network, tuple(float(s) for s in sigmas)
        self.hits = 0
        self._kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getattr__(self, name: str):
        if name == "network":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.network, name)

    def _key(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple | None:
        """(σ, shape, digest of the images' bytes) of a pass worth keeping, else None."""
        levels = sigma.detach().reshape(-1)
        if x.requires_grad or not len(levels) or not bool((levels == levels[0]).all()):
            return None
        level = float(levels[0])
        if not any(math.isclose(level, s, rel_tol=1e-6) for s in self.sigmas):
            return None
        data = np.ascontiguousarray(x.detach().cpu().numpy())
        return level, data.shape, str(data.dtype), hashlib.blake2b(data, digest_size=16).digest()

    def scaled_score_and_mid(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ·s(x, σ), middle-block activations), as the network's; from a kept pass when there is one."""
        key = self._key(x, sigma)
        if key is None:
            return self.network.scaled_score_and_mid(x, sigma)
        if key in self._kept:
            self.hits += 1
        else:
            self._kept[key] = self.network.scaled_score_and_mid(x, sigma)
        out, mid = self._kept[key]
        return out.clone(), mid.clone()

    def scaled_score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """σ·s(x, σ), shapes as :meth:`scaled_score_and_mid`."""
        return self.scaled_score_and_mid(x, sigma)[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The score s(x, σ), units 1/pixel."""
        return self.scaled_score(x, sigma) / sigma.reshape(-1, 1, 1, 1).to(torch.float32)
