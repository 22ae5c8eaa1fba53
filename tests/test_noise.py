"""Tests for dgmood.models.noise: the MSMA σ grid, the σ ↔ t map of the VP-SDE, and vp_score on a Gaussian."""

import math

import numpy as np
import pytest
import torch

from dgmood.models.noise import BETA_MAX, BETA_MIN, geometric_sigmas, sigma_to_t, t_to_sigma, vp_alpha, vp_score

T_GRID = np.geomspace(1e-4, 1.0, 201)


# --- geometric_sigmas ---------------------------------------------------------------------------


def test_geometric_sigmas_default_is_msma_grid():
    s = geometric_sigmas()
    assert s.shape == (10,)
    assert s[0] == pytest.approx(1.0, rel=1e-14)
    assert s[-1] == pytest.approx(0.01, rel=1e-14)
    ratios = s[1:] / s[:-1]
    np.testing.assert_allclose(ratios, 0.01 ** (1 / 9), rtol=1e-12)  # constant ratio
    assert np.all(np.diff(s) < 0)


def test_geometric_sigmas_custom_range():
    s = geometric_sigmas(2.0, 0.5, 3)
    np.testing.assert_allclose(s, [2.0, 1.0, 0.5], rtol=1e-14)


def test_geometric_sigmas_single_level_is_sigma_max():
    s = geometric_sigmas(0.7, 0.01, 1)
    assert s.shape == (1,)
    assert s[0] == 0.7


def test_geometric_sigmas_equal_ends():
    np.testing.assert_allclose(geometric_sigmas(0.3, 0.3, 4), [0.3] * 4, rtol=1e-14)


@pytest.mark.parametrize(
    "args",
    [(1.0, 0.01, 0), (1.0, 0.01, -3), (1.0, 0.0, 10), (1.0, -0.1, 10), (0.01, 1.0, 10)],
)
def test_geometric_sigmas_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        geometric_sigmas(*args)


# --- vp_alpha, t_to_sigma, sigma_to_t ---------------------------------------------------------


def test_vp_alpha_known_values():
    assert vp_alpha(0.0) == 1.0
    assert vp_alpha(1.0) == pytest.approx(math.exp(-0.5 * (BETA_MIN + 0.5 * (BETA_MAX - BETA_MIN))), rel=1e-14)
    # direct numerical integral of the linear β schedule at t = 0.37
    s = np.linspace(0.0, 0.37, 100001)
    beta = BETA_MIN + s * (BETA_MAX - BETA_MIN)
    integral = np.sum((beta[1:] + beta[:-1]) / 2 * np.diff(s))  # trapezoid rule, exact for linear β
    assert vp_alpha(0.37) == pytest.approx(math.exp(-0.5 * integral), rel=1e-9)
    tt = torch.tensor(T_GRID, dtype=torch.float64)
    np.testing.assert_allclose(vp_alpha(tt).numpy(), vp_alpha(T_GRID), rtol=1e-14)


def test_t_to_sigma_matches_direct_formula():
    alpha = vp_alpha(T_GRID)
    direct = np.sqrt(1 - alpha**2) / alpha / 2
    np.testing.assert_allclose(t_to_sigma(T_GRID), direct, rtol=1e-8)
    # scale = 1: the diffusion runs on [0, 1] itself, so σ is twice as large as for scale 2
    np.testing.assert_allclose(t_to_sigma(T_GRID, scale=1.0), np.sqrt(1 - alpha**2) / alpha, rtol=1e-8)
    assert np.all(np.diff(t_to_sigma(T_GRID)) > 0)


def test_t_to_sigma_torch_matches_numpy():
    tt = torch.tensor(T_GRID, dtype=torch.float64)
    np.testing.assert_allclose(t_to_sigma(tt).numpy(), t_to_sigma(T_GRID), rtol=1e-13)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sigma_t_round_trip_numpy(scale):
    np.testing.assert_allclose(sigma_to_t(t_to_sigma(T_GRID, scale), scale), T_GRID, rtol=1e-9)
    sig = np.geomspace(1e-3, 80.0, 101)
    np.testing.assert_allclose(t_to_sigma(sigma_to_t(sig, scale), scale), sig, rtol=1e-9)
    for t in (1e-4, 0.01, 0.5, 1.0):  # plain floats
        assert sigma_to_t(t_to_sigma(t, scale), scale) == pytest.approx(t, rel=1e-9)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_sigma_t_round_trip_torch(dtype, rtol):
    tt = torch.tensor(T_GRID, dtype=dtype)
    back = sigma_to_t(t_to_sigma(tt))
    assert isinstance(back, torch.Tensor) and back.dtype == dtype
    np.testing.assert_allclose(back.double().numpy(), T_GRID, rtol=rtol)


def test_sigma_to_t_endpoints():
    assert sigma_to_t(0.0) == 0.0
    assert sigma_to_t(float(t_to_sigma(1.0))) == pytest.approx(1.0, rel=1e-12)


# --- vp_score on an analytic Gaussian ---------------------------------------------------------

M_PIX = 0.3  # pixel mean (per pixel, broadcast below)
S_PIX = 0.2  # pixel standard deviation


def _pixel_mean(shape):
    # a mean that differs per pixel, to catch a wrongly placed shift
    return M_PIX + 0.1 * torch.linspace(-1, 1, math.prod(shape), dtype=torch.float64).reshape(shape)


def _analytic_pixel_score(mean):
    """Smoothed score of N(mean, S² I) on the pixel scale: −(x̃ − m)/(S² + σ²)."""

    def score(x, sigma):
        assert sigma.shape == (x.shape[0],)
        return -(x - mean) / (S_PIX**2 + sigma[:, None, None, None] ** 2)

    return score


@pytest.mark.parametrize("scale", [2.0, 1.0])
@pytest.mark.parametrize("t", [1e-4, 1e-2, 0.1, 0.5, 1.0])
def test_vp_score_on_gaussian(t, scale):
    shape = (1, 4, 5)
    mean = _pixel_mean(shape)
    alpha = float(vp_alpha(t))
    # y = scale·x − (scale − 1) ~ N(scale·m − (scale−1), scale² S²); x_t = α y + sqrt(1 − α²) ε
    mean_t = alpha * (scale * mean - (scale - 1))
    var_t = alpha**2 * scale**2 * S_PIX**2 + 1 - alpha**2
    g = torch.Generator().manual_seed(0)
    x_t = mean_t + math.sqrt(var_t) * torch.randn((6, *shape), generator=g, dtype=torch.float64)
    expected = -(x_t - mean_t) / var_t
    got = vp_score(_analytic_pixel_score(mean), x_t, t, scale=scale)
    assert got.shape == x_t.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_vp_score_passes_sigma_of_t():
    seen = {}

    def score_fn(x, sigma):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    vp_score(score_fn, torch.zeros(3, 1, 2, 2, dtype=torch.float64), 0.3)
    np.testing.assert_allclose(seen["sigma"].numpy(), [t_to_sigma(0.3)] * 3, rtol=1e-14)
