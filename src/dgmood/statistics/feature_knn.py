"""k-NN distance in the score network's own feature space, with the spatial layout kept.

The raw-pixel k-NN generalises well but compares pixels; the score norms compare how hard the model pushes,
summed over pixels. This compares what the network sees where: the activations of the UNet's middle block
(C × h × w at the coarsest resolution, e.g. 96 × 4 × 4 on 28 × 28 images) for the image at a small σ,
flattened so that position counts, reduced by a PCA fitted on training activations, and the Euclidean distance
to the k-th nearest training image there (eq. K1). An upside-down shirt keeps its pixel statistics and much of
its score norm, but its coarse layout of features is that of no training image.
"""

from __future__ import annotations

import numpy as np
import torch

from dgmood.statistics.base import Statistic, register

__all__ = ["FeatureKNN", "mid_features"]


@torch.no_grad()
def mid_features(model, images: np.ndarray, sigma: float, batch_size: int = 256, device="cpu") -> np.ndarray:
    """The middle block's activations of ``model.scaled_score(x, σ)``, flattened: (N, C·h·w) float32.

    Args:
        model: A :class:`~dgmood.models.network.ScoreNet` or its :class:`~dgmood.models.exported.OnnxScoreNet`.
        images: (N, C, H, W) in [0, 1].
        sigma: Noise level the network is conditioned on (the images are not noised).
    """
    if not hasattr(model, "scaled_score_and_mid"):
        raise ValueError("feature k-NN needs a score network with a middle block (a ScoreNet)")
    x_all = torch.as_tensor(np.asarray(images, dtype=np.float32))
    captured = []
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(device)
        _, mid = model.scaled_score_and_mid(x, torch.full((len(x),), float(sigma), device=device))
        captured.append(mid.flatten(1).cpu())
    return torch.cat(captured).numpy() if captured else np.zeros((0, 0), np.float32)


@register
class FeatureKNN(Statistic):
    """Eq. K1: distance from an image's PCA-reduced middle-block features to the k-th nearest training image's,
    shape (N,).

    ``fit`` keeps the first ``max_bank`` training images' reduced features (``bank_``, float32 (M, dims)) and the
    PCA (``mean_``, ``components_``); training images' own values leave their zero distance out.

    Args:
        sigma: Noise level of the features.
        k: Which neighbour.
        dims: PCA dimensions.
        max_bank: Training images in the bank (at most).
        batch_size: Images per network call.
    """

    name = "feature_knn"
    log_scale = True
    forward_only = True
    fitted = ("mean_", "components_", "bank_")

    def __init__(self, sigma=0.1, k=5, dims=128, max_bank=20000, batch_size=256):
        self.sigma, self.k, self.dims = float(sigma), int(k), int(dims)
        self.max_bank, self.batch_size = int(max_bank), int(batch_size)
        self.mean_ = self.components_ = self.bank_ = None

    @property
    def shared_sigmas(self) -> tuple[float, ...]:
        """Its one clean-image pass, at ``sigma`` (shared with the score norms when they include that level)."""
        return (self.sigma,)

    def _reduce(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean_) @ self.components_.T).astype(np.float32)

    def fit(self, model, images, device="cpu", progress=False):
        from sklearn.decomposition import PCA

        features = mid_features(model, images[:self.max_bank], self.sigma, self.batch_size, device)
        pca = PCA(n_components=min(self.dims, *features.shape), random_state=0).fit(features)
        self.mean_, self.components_ = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
        self.bank_ = self._reduce(features)
        return self

    def _distances(self, model, images, device, exclude_self: bool) -> np.ndarray:
        from dgmood.statistics.knn import knn_distance

        if not self.is_fitted():
            raise ValueError("FeatureKNN is not fitted; call fit(model, train_images) first")
        queries = self._reduce(mid_features(model, images, self.sigma, self.batch_size, device))
        return knn_distance(self.bank_, queries, self.k, exclude_self=exclude_self).astype(np.float64)

    def compute(self, model, images, device="cpu", progress=False):
        return self._distances(model, images, device, False)

    def compute_training(self, model, images, device="cpu", progress=False):
        return self._distances(model, images, device, True)

    def cache_settings(self, training: bool = False) -> dict:
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.bank_).tobytes()).hexdigest()[:16]
        return {**self.get_params(), "bank": digest, "leave_one_out": bool(training)}
