"""Shared forward passes: the feature k-NN reads the score norms' pass at its σ, with the same values as alone."""

import numpy as np
import pytest
import torch
from conftest import random_head_net

from dgmood.detectors.estimators import CombinedDetector
from dgmood.methods.image_detector import ImageDetector
from dgmood.methods.recipes import MethodConfig, build_detector, feature_sigma
from dgmood.models.shared_passes import SharedPasses
from dgmood.statistics.feature_knn import FeatureKNN
from dgmood.statistics.score_norms import ScoreNorms


class Counting:
    """A network that counts the images it is run on."""

    def __init__(self, net):
        self.net, self.images = net, 0
        self.config = net.config

    def scaled_score_and_mid(self, x, sigma):
        self.images += len(x)
        with torch.no_grad():
            return self.net.scaled_score_and_mid(x, sigma)

    def scaled_score(self, x, sigma):
        return self.scaled_score_and_mid(x, sigma)[0]


@pytest.fixture(scope="module")
def fashion(data_dir):
    from dgmood.data.datasets import load_images

    return load_images("fashion-mnist:test[:300]", data_dir)


def test_a_kept_pass_is_returned_for_the_same_images_and_sigma_only():
    net = Counting(random_head_net((1, 28, 28), channels=(8, 16)))
    shared = SharedPasses(net, [0.1])
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    at = lambda s, n=6: torch.full((n,), s)
    first, mid = shared.scaled_score_and_mid(x, at(0.1))
    again, mid_again = shared.scaled_score_and_mid(x.clone(), at(0.1))
    assert shared.hits == 1 and net.images == 6
    assert torch.equal(first, again) and torch.equal(mid, mid_again)
    again.add_(1.0)  # a caller writing into its result does not change the kept pass
    assert torch.equal(shared.scaled_score(x, at(0.1)), first) and shared.hits == 2
    shared.scaled_score(x, at(0.3))  # another σ: passes through
    shared.scaled_score(x + 1e-3, at(0.1))  # other images
    shared.scaled_score(x, torch.tensor([0.1] * 5 + [0.2]))  # mixed σ
    assert shared.hits == 2 and net.images == 24
    torch.testing.assert_close(shared(x, at(0.1)), first / 0.1)
    assert shared.config is net.config


def test_the_detector_runs_the_feature_pass_once_with_the_same_values(fashion):
    net = random_head_net((1, 28, 28), channels=(8, 16))
    stats = lambda: [ScoreNorms((1.0, 0.1), batch_size=64), FeatureKNN(0.1, dims=8, max_bank=200, batch_size=64)]
    alone = [s.fit(net, fashion[:200]) for s in stats()]
    expected = {s.name: s.compute(net, fashion[200:]) for s in alone}
    counting = Counting(net)
    det = ImageDetector(counting, alone, CombinedDetector(max_components=1), runtime="torch")
    got = det.statistic_values(fashion[200:])
    assert counting.images == 2 * 100  # score norms at 1.0 and 0.1; the feature k-NN read the pass at 0.1
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values)


def test_the_default_feature_sigma_is_a_score_norm_level():
    cfg = MethodConfig()
    assert feature_sigma(cfg) in cfg.sigmas[::cfg.combined_sigma_stride]
    assert feature_sigma(MethodConfig(feature_knn_sigma=0.3)) == 0.3
    with pytest.raises(ValueError, match="feature_knn_sigma"):
        MethodConfig(feature_knn_sigma=0.0)
    det = build_detector("combined", random_head_net((1, 28, 28), channels=(8, 16)), "score")
    fknn = next(s for s in det.statistics if s.name == "feature_knn")
    assert fknn.shared_sigmas == (feature_sigma(cfg),)
