"""EDM Heun sampler: converges to a Gaussian's exact probability-flow ODE at second order; the ScoreNet contract."""

import numpy as np
import pytest
import torch

from dgmood.models.diffusion import karras_sigmas
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.models.sampling import heun_sampler, sample_score_model

MU, S, SIGMA_MAX = 0.3, 0.1, 80.0


def gaussian_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact score of N(MU, S²) per pixel smoothed by N(0, σ²): −(x − MU) / (S² + σ²)."""
    return -(x - MU) / (S**2 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


def exact_flow(z: np.ndarray) -> np.ndarray:
    """The probability-flow ODE of the smoothed Gaussian from x = 0.5 + σ_max z down to σ = 0: the offset from MU
    scales with √(S² + σ²), so x₀ = MU + (x − MU) S / √(S² + σ_max²)."""
    return MU + (0.5 + SIGMA_MAX * z - MU) * S / np.sqrt(S**2 + SIGMA_MAX**2)


def _gaussian_samples(steps: int, n: int = 500) -> tuple[np.ndarray, np.ndarray]:
    x = sample_score_model(gaussian_score, n, steps=steps, generator=torch.Generator().manual_seed(0),
                           shape=(1, 4, 4), clamp=False)
    z = torch.randn((n, 1, 4, 4), generator=torch.Generator().manual_seed(0)).numpy()
    return x, exact_flow(z)


def test_gaussian_samples_follow_the_exact_flow_and_the_data_law():
    x, exact = _gaussian_samples(steps=200, n=4000)
    np.testing.assert_allclose(x, exact, rtol=0, atol=2e-3)  # per sample: the ODE's own solution
    assert x.mean() == pytest.approx(MU, abs=0.005)  # and in law: N(MU, S²)
    assert x.std() == pytest.approx(S, rel=0.03)


def test_heun_is_second_order():
    """Error against the exact flow falls like (1/steps)²: 18 → 40 steps cuts it about 5-fold (Euler: 2-fold)."""
    errors = [np.abs(x - exact).mean() for x, exact in (_gaussian_samples(steps) for steps in (18, 40))]
    assert errors[1] < errors[0] / 4
    assert errors[0] < 0.1 * S  # EDM's 18 steps: within 10 % of the data's std per sample


def test_network_calls_are_two_per_step_less_one():
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_score(x, sigma)

    heun_sampler(counting, torch.zeros(3, 1, 2, 2), karras_sigmas(SIGMA_MAX, 0.002, 18))
    assert len(calls) == 2 * 18 - 1
    assert calls[0] == SIGMA_MAX and min(calls) == pytest.approx(0.002)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8, 16))).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # an untrained but non-zero score
    return model


def test_score_net_samples_shape_range_and_determinism(net):
    def draw(seed, batch_size):
        return sample_score_model(net, 7, steps=5, generator=torch.Generator().manual_seed(seed), batch_size=batch_size)

    a = draw(1, 3)
    assert a.shape == (7, 1, 8, 8) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, draw(1, 3))  # same seed, same images
    np.testing.assert_allclose(a, draw(1, 7), atol=1e-5)  # independent of the batch size
    assert not np.allclose(a, draw(2, 3))


def test_rejects_bad_arguments(net):
    with pytest.raises(ValueError):
        sample_score_model(net, 2, batch_size=0)
    assert sample_score_model(net, 0, steps=3).shape == (0, 1, 8, 8)
