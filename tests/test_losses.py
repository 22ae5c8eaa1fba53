"""Tests for dgmood.models.losses: DSM on a Gaussian with the exact score, and the σ sampler."""

import math

import numpy as np
import pytest
import torch

from dgmood.models.losses import dsm_loss, sample_sigmas

M, S = 0.4, 0.15  # data: pixels i.i.d. N(M, S²)
SHAPE = (1, 8, 8)
D = math.prod(SHAPE)


class GaussianScaledScore:
    """The exact σ·s(x̃, σ) of N(mean, S² I) smoothed by N(0, σ² I), optionally scaled by ``gain``."""

    def __init__(self, mean=M, std=S, gain=1.0):
        self.mean, self.std, self.gain = mean, std, gain

    def scaled_score(self, x, sigma):
        sig = sigma[:, None, None, None]
        return self.gain * sig * (-(x - self.mean) / (self.std**2 + sig**2))


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return M + S * torch.randn((n, *SHAPE), generator=g, dtype=torch.float64)


def _noise(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5, 3.0])
def test_exact_model_attains_optimal_loss(sigma):
    # residual F* + ε = ε S²/(S²+σ²) − σ(x−M)/(S²+σ²) has per-pixel variance S²/(S²+σ²),
    # so E[loss] = D/2 · S²/(S² + σ²).
    n = 20000
    x = _data(n)
    sig = torch.full((n,), sigma, dtype=torch.float64)
    loss = dsm_loss(GaussianScaledScore(), x, sig, _noise(n))
    expected = D / 2 * S**2 / (S**2 + sigma**2)
    # the mean of n scaled χ²_D variables has relative sd sqrt(2/(nD)) ≈ 0.0013
    assert loss.mean().item() == pytest.approx(expected, rel=0.01)


def test_per_sample_sigmas():
    # a different σ per image: the per-image expectation must follow each σ
    n_per, sigmas = 4000, [0.02, 0.2, 2.0]
    x = _data(n_per * 3)
    sig = torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(n_per)
    loss = dsm_loss(GaussianScaledScore(), x, sig, _noise(len(x))).reshape(3, n_per).mean(dim=1)
    expected = [D / 2 * S**2 / (S**2 + s**2) for s in sigmas]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=0.02)


@pytest.mark.parametrize(
    "perturbed", [GaussianScaledScore(gain=1.2), GaussianScaledScore(gain=0.8), GaussianScaledScore(mean=M + 0.05),
                  GaussianScaledScore(std=2 * S)],
)
def test_exact_model_beats_perturbed(perturbed):
    n, sigma = 20000, 0.2
    x, eps = _data(n), _noise(n)
    sig = torch.full((n,), sigma, dtype=torch.float64)
    exact = GaussianScaledScore()
    l_exact = dsm_loss(exact, x, sig, eps).mean().item()
    l_pert = dsm_loss(perturbed, x, sig, eps).mean().item()
    assert l_pert > l_exact
    # at the optimum the residual is orthogonal to any change ΔF, so the gap is E‖ΔF‖²/2
    x_noisy = x + sigma * eps
    gap = 0.5 * (perturbed.scaled_score(x_noisy, sig) - exact.scaled_score(x_noisy, sig)).flatten(1).square().sum(1)
    assert l_pert - l_exact == pytest.approx(gap.mean().item(), rel=0.05)


def test_dsm_loss_shape_and_given_noise():
    n = 5
    x = _data(n)
    sig = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    eps = _noise(n)
    model = GaussianScaledScore(gain=0.7)
    loss = dsm_loss(model, x, sig, eps)
    assert loss.shape == (n,)
    # by hand: ½‖F(x + σε, σ) + ε‖² summed over pixels
    by_hand = 0.5 * ((model.scaled_score(x + sig[:, None, None, None] * eps, sig) + eps) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=0)
    # the same noise gives the same loss; zero noise gives ½‖F(x)‖²
    torch.testing.assert_close(dsm_loss(model, x, sig, eps), loss, rtol=0, atol=0)
    zero = dsm_loss(model, x, sig, torch.zeros_like(x))
    torch.testing.assert_close(zero, 0.5 * model.scaled_score(x, sig).square().sum(dim=(1, 2, 3)))


def test_dsm_loss_draws_noise_when_omitted():
    x = _data(3)
    sig = torch.full((3,), 0.3, dtype=torch.float64)
    torch.manual_seed(0)
    a = dsm_loss(GaussianScaledScore(), x, sig)
    torch.manual_seed(0)
    b = dsm_loss(GaussianScaledScore(), x, sig, torch.randn_like(x))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, dsm_loss(GaussianScaledScore(), x, sig))


def test_dsm_loss_backpropagates():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def scaled_score(self, x, sigma):
            return self.w * (x - M)

    model = Linear()
    dsm_loss(model, _data(4).float(), torch.full((4,), 0.1), _noise(4).float()).mean().backward()
    assert model.w.grad is not None and torch.isfinite(model.w.grad)


# --- sample_sigmas ---------------------------------------------------------------------------


def test_sample_sigmas_range_dtype_shape():
    s = sample_sigmas(50000, 0.002, 80.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (50000,) and s.dtype == torch.float32
    assert s.min().item() >= np.float32(0.002) * (1 - 1e-6)
    assert s.max().item() <= np.float32(80.0) * (1 + 1e-6)
    # both ends of the wide band are actually reached
    assert s.min().item() < 0.003 and s.max().item() > 50.0


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.75, 1.0])
def test_sample_sigmas_focus_share_disjoint_bands(weight):
    # focus band [0.01, 0.1] and wide band [1, 10] do not overlap: the focus share is the weight
    n = 40000
    s = sample_sigmas(n, 1.0, 10.0, focus=(0.01, 0.1), focus_weight=weight,
                      generator=torch.Generator().manual_seed(1))
    in_focus = (s <= 0.1 + 1e-6).double().mean().item()
    assert in_focus == pytest.approx(weight, abs=4 * math.sqrt(0.25 / n) + 1e-12)
    assert bool(((s >= 0.01 * (1 - 1e-6)) & (s <= 0.1 * (1 + 1e-6)) | (s >= 1 * (1 - 1e-6)) & (s <= 10 * (1 + 1e-6))).all())


def test_sample_sigmas_log_uniform_within_bands():
    n = 40000
    s = sample_sigmas(n, 1.0, 100.0, focus=(0.01, 0.1), focus_weight=0.5,
                      generator=torch.Generator().manual_seed(2)).double()
    focus, wide = s[s < 0.5].log10(), s[s > 0.5].log10()
    # log10 σ uniform on [−2, −1] and on [0, 2]: means −1.5 and 1, variances 1/12 and 4/12
    assert focus.mean().item() == pytest.approx(-1.5, abs=0.01)
    assert focus.var().item() == pytest.approx(1 / 12, rel=0.03)
    assert wide.mean().item() == pytest.approx(1.0, abs=0.02)
    assert wide.var().item() == pytest.approx(4 / 12, rel=0.03)


def test_sample_sigmas_overlapping_bands_default():
    # default bands overlap: P(σ ∈ [0.01, 1]) = w + (1 − w)·log(100)/log(80/0.002)
    n, w = 40000, 0.75
    s = sample_sigmas(n, 0.002, 80.0, focus_weight=w, generator=torch.Generator().manual_seed(3))
    share = ((s >= 0.01 * (1 - 1e-6)) & (s <= 1.0 + 1e-6)).double().mean().item()
    expected = w + (1 - w) * math.log(100) / math.log(80 / 0.002)
    assert share == pytest.approx(expected, abs=0.01)


def test_sample_sigmas_reproducible_with_generator():
    a = sample_sigmas(1000, 0.002, 80.0, generator=torch.Generator().manual_seed(7))
    b = sample_sigmas(1000, 0.002, 80.0, generator=torch.Generator().manual_seed(7))
    c = sample_sigmas(1000, 0.002, 80.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
