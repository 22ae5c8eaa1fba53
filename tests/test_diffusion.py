"""Tests for dgmood.models.diffusion on Gaussian data, whose smoothed scores, densities and PF-ODE flows are exact."""

import math

import pytest
import torch

from dgmood.models.diffusion import flipd, normal_bundle_lid, pf_ode_log_likelihood, reconstruction_error, score_norm
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.models.noise import vp_alpha

D = 16
SHAPE = (1, 4, 4)


class Gaussian:
    """Pixel data N(m, U diag(λ) Uᵀ) in float64; its σ-smoothed score is −(Σ + σ²I)⁻¹ (x − m)."""

    def __init__(self, lam: torch.Tensor, seed: int = 0, rotate: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.lam = lam.double()
        self.mean = torch.full((D,), 0.5, dtype=torch.float64)
        self.u = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0] if rotate else torch.eye(D)
        self.u = self.u.double()
        self.cov = self.u @ torch.diag(self.lam) @ self.u.T

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) - self.mean) @ self.u / (self.lam + sigma[:, None] ** 2)
        return -(z @ self.u.T).view_as(x)

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        z = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (self.mean + (z * self.lam.sqrt()) @ self.u.T).view(n, *SHAPE)

    def whitened(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates Uᵀ(x − m), shape (N, D)."""
        return (x.flatten(1) - self.mean) @ self.u

    def vp_log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """log p_t(2x − 1) of the VP marginal at time t, on the diffusion's [−1, 1] scale."""
        a = float(vp_alpha(t))
        cov = 4 * a * a * self.cov + (1 - a * a) * torch.eye(D, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(a * (2 * self.mean - 1), cov)
        return dist.log_prob(2 * x.flatten(1) - 1)


@pytest.fixture(scope="module")
def full_rank():
    """Anisotropic, rotated: pixel standard deviations 0.1–0.25 (so the Jacobian is neither diagonal nor I)."""
    lam = 0.01 + 0.05 * torch.rand(D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return Gaussian(lam)


@pytest.fixture(scope="module")
def low_rank():
    """d = 4 directions of variance 1, D − d = 12 of variance 1e-8: a 4-dimensional linear 'manifold'."""
    return Gaussian(torch.cat([torch.ones(4), torch.full((D - 4,), 1e-8)]))


# --- pf_ode_log_likelihood ----------------------------------------------------------------------------------------


def test_pf_ode_adaptive_exact_divergence_matches_gaussian_density(full_rank):
    # Remaining error: solver tolerance and the prior p_1 ≠ N(0, I) (α_1² ≈ 4e-5 per dimension); measured 2e-4.
    x = full_rank.sample(8)
    r = pf_ode_log_likelihood(full_rank, x, t_eps=1e-2, solver="adaptive", probe="exact", rtol=1e-6, atol=1e-6)
    expected = full_rank.vp_log_prob(x, 1e-2) + D * math.log(2)
    torch.testing.assert_close(r["nats"], expected, atol=5e-3, rtol=0)
    assert isinstance(r["nfe"], int) and r["nfe"] > 0


def test_pf_ode_bpd_is_the_8_bit_conversion(full_rank):
    x = full_rank.sample(4)
    r = pf_ode_log_likelihood(full_rank, x, solver="adaptive", probe="exact", rtol=1e-6, atol=1e-6)
    by_hand = -full_rank.vp_log_prob(x, 1e-2) / (D * math.log(2)) + 7  # [−1, 1] density → 8-bit bits/dim
    torch.testing.assert_close(r["bpd"], by_hand, atol=5e-3 / (D * math.log(2)), rtol=0)
    torch.testing.assert_close(r["bpd"], (-r["nats"] + D * math.log(256)) / (D * math.log(2)))


def test_pf_ode_tiny_t_eps_gives_the_clean_pixel_density(full_rank):
    x = full_rank.sample(4)
    r = pf_ode_log_likelihood(full_rank, x, t_eps=1e-5, solver="adaptive", probe="exact", rtol=1e-7, atol=1e-7)
    clean = torch.distributions.MultivariateNormal(full_rank.mean, full_rank.cov).log_prob(x.flatten(1))
    torch.testing.assert_close(r["nats"], clean, atol=5e-3, rtol=0)


def test_pf_ode_euler_converges_at_first_order(full_rank):
    # The paper's 25 Euler steps are off by about 1 nat here (0.1 nat/dim); the error falls like 1/steps.
    x = full_rank.sample(4)
    expected = full_rank.vp_log_prob(x, 1e-2) + D * math.log(2)
    errors = [
        (pf_ode_log_likelihood(full_rank, x, steps=n, probe="exact")["nats"] - expected).abs().max().item()
        for n in (25, 100, 400)
    ]
    assert errors[0] < 2.0
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3
    assert errors[2] < 0.1
    assert pf_ode_log_likelihood(full_rank, x, steps=7, probe="exact")["nfe"] == 7


def test_pf_ode_heun_converges_at_second_order(full_rank):
    # eq. H1: doubling the steps cuts the error about fourfold, and beats Euler at equal network evaluations
    x = full_rank.sample(4)
    expected = full_rank.vp_log_prob(x, 1e-2) + D * math.log(2)
    errors = [
        (pf_ode_log_likelihood(full_rank, x, steps=n, solver="heun", probe="exact")["nats"] - expected)
        .abs().max().item() for n in (10, 20, 40)
    ]
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3
    euler = (pf_ode_log_likelihood(full_rank, x, steps=80, probe="exact")["nats"] - expected).abs().max().item()
    assert errors[2] < euler / 3
    assert pf_ode_log_likelihood(full_rank, x, steps=7, solver="heun", probe="exact")["nfe"] == 14


def test_pf_ode_geometric_grid_helps_near_a_manifold():
    # Pixel std 3e-3–4e-3: the field is stiff near t_eps and a uniform 25-step grid is off by ~2 nat/dim.
    narrow = Gaussian(1e-5 * (1 + torch.rand(D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)))
    x = narrow.sample(4)
    expected = narrow.vp_log_prob(x, 1e-2) + D * math.log(2)
    error = lambda spacing: (pf_ode_log_likelihood(narrow, x, probe="exact", spacing=spacing)["nats"] - expected).abs().max()
    assert error("geometric") < error("uniform") / 3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_pf_ode_hutchinson_is_unbiased(full_rank, probe):
    # The state path does not depend on the probes, so one-probe estimates scatter around the exact-divergence
    # Euler result; replicas of one image get independent probes.
    x = full_rank.sample(1).expand(400, *SHAPE)
    exact = pf_ode_log_likelihood(full_rank, x[:1], steps=10, probe="exact")["nats"]
    g = torch.Generator().manual_seed(0)
    nats = pf_ode_log_likelihood(full_rank, x, steps=10, probes=1, probe=probe, generator=g)["nats"]
    assert nats.std() > 0
    assert abs(nats.mean() - exact) < 4 * nats.std() / math.sqrt(len(nats))


def test_pf_ode_generator_determinism_and_validation(full_rank):
    x = full_rank.sample(3)
    run = lambda seed: pf_ode_log_likelihood(full_rank, x, steps=5, probes=2, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a["nats"].shape == a["bpd"].shape == (3,)
    torch.testing.assert_close(a["nats"], b["nats"], rtol=0, atol=0)
    assert not torch.equal(a["nats"], c["nats"])
    with pytest.raises(ValueError, match="solver"):
        pf_ode_log_likelihood(full_rank, x, solver="rk4")
    with pytest.raises(ValueError, match="spacing"):
        pf_ode_log_likelihood(full_rank, x, spacing="cosine")
    with pytest.raises(ValueError, match="probe"):
        pf_ode_log_likelihood(full_rank, x, probe="sobol")


# --- flipd --------------------------------------------------------------------------------------------------------


def test_flipd_exact_matches_closed_form(low_rank):
    x, s2 = low_rank.sample(6), 0.05**2
    z = low_rank.whitened(x)
    closed = D + s2 * (-(1 / (low_rank.lam + s2)).sum() + (z**2 / (low_rank.lam + s2) ** 2).sum(1))
    torch.testing.assert_close(flipd(low_rank, x, 0.05, exact=True), closed)


def test_flipd_recovers_intrinsic_dimension_between_the_scales(low_rank):
    # Scales: off-manifold std 1e-4, on-manifold std 1. Between them LID ≈ 4; far below, every direction counts
    # (≈ D); far above, the data looks like a point (≈ 0).
    x = low_rank.sample(8)
    torch.testing.assert_close(flipd(low_rank, x, 1e-2, exact=True), torch.full((8,), 4.0, dtype=x.dtype), atol=0.05, rtol=0)
    assert (flipd(low_rank, x, 1e-6, exact=True) > D - 0.05).all()
    assert (flipd(low_rank, x, 30.0, exact=True) < 0.05).all()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_flipd_hutchinson_is_unbiased(low_rank, probe):
    x = low_rank.sample(1).expand(2000, *SHAPE)
    exact = flipd(low_rank, x[:1], 1e-2, exact=True)
    est = flipd(low_rank, x, 1e-2, probes=1, probe=probe, generator=torch.Generator().manual_seed(0))
    assert est.shape == (2000,) and est.std() > 0
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(len(est))


def test_flipd_generator_determinism(low_rank):
    x = low_rank.sample(3)
    run = lambda seed: flipd(low_rank, x, 1e-2, probes=3, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(5), run(5), rtol=0, atol=0)
    assert not torch.equal(run(5), run(6))


# --- normal_bundle_lid --------------------------------------------------------------------------------------------


def test_normal_bundle_recovers_intrinsic_dimension(low_rank):
    # Spectrum at σ(t0 = 0.01) = 0.022, K = 64: 12 normal values ≥ ~200, then ~16 (the score's tangential
    # mean), then ~0.2: the largest drop is after the normal ones, and τ = 100 separates them too.
    x = low_rank.sample(8)
    g = torch.Generator().manual_seed(0)
    lid, sv = normal_bundle_lid(low_rank, x, generator=g)
    assert sv.shape == (8, D)
    assert (sv[:, :-1] >= sv[:, 1:]).all()
    torch.testing.assert_close(lid, torch.full((8,), 4.0, dtype=x.dtype), rtol=0, atol=0)
    lid_tau, _ = normal_bundle_lid(low_rank, x, tau=100.0, generator=g)
    torch.testing.assert_close(lid_tau, lid, rtol=0, atol=0)
    assert (normal_bundle_lid(low_rank, x, tau=0.0, generator=g)[0] == 0).all()


def test_normal_bundle_shapes_batching_and_determinism(low_rank):
    x = low_rank.sample(3)
    run = lambda batch: normal_bundle_lid(low_rank, x, n_perturb=10, batch_size=batch, generator=torch.Generator().manual_seed(2))
    lid, sv = run(7)
    assert lid.shape == (3,) and sv.shape == (3, 10)
    torch.testing.assert_close(run(7)[1], sv, rtol=0, atol=0)
    assert (lid >= D - 10).all() and (lid <= D - 1).all()  # K < D perturbations can show at most K normal directions
    lid_sigma, _ = normal_bundle_lid(low_rank, x, sigma0=0.02, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lid_sigma, torch.full((3,), 4.0, dtype=x.dtype), rtol=0, atol=0)


# --- baselines ----------------------------------------------------------------------------------------------------

ISOTROPIC_STD = 0.2


@pytest.fixture(scope="module")
def isotropic():
    return Gaussian(torch.full((D,), ISOTROPIC_STD**2), rotate=False)


def test_score_norm_is_the_closed_form(isotropic):
    x = isotropic.sample(5)
    expected = (x.flatten(1) - 0.5).norm(dim=1) / (ISOTROPIC_STD**2 + 0.01**2)
    torch.testing.assert_close(score_norm(isotropic, x, 0.01), expected)


def test_reconstruction_matches_the_exact_flow(isotropic):
    # For N(m, s² I) the PF-ODE moves x_σ − m by the factor s / sqrt(s² + σ²) from σ to 0.
    x, sigmas = isotropic.sample(6), (0.05, 0.2, 0.8)
    err = reconstruction_error(isotropic, x, sigmas, steps=400, generator=torch.Generator().manual_seed(4))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    s = ISOTROPIC_STD
    exact = torch.stack(
        [((0.5 + (x + sig * eps - 0.5) * s / math.sqrt(s**2 + sig**2)) - x).flatten(1).square().mean(1) for sig in sigmas],
        dim=1,
    )
    assert err.shape == (6, 3)
    torch.testing.assert_close(err, exact, rtol=0.02, atol=1e-6)


def test_reconstruction_separates_far_points_and_is_deterministic(isotropic):
    near = isotropic.sample(8)
    far = near + 1.0  # five standard deviations away in every pixel
    run = lambda x: reconstruction_error(isotropic, x, steps=10, generator=torch.Generator().manual_seed(0))
    assert (run(far).mean(0) > 2 * run(near).mean(0)).all()  # closed form: ratio 2.4 at σ = 0.1, 13 at σ = 1.6
    torch.testing.assert_close(run(near), run(near), rtol=0, atol=0)


# --- a real network -----------------------------------------------------------------------------------------------


def test_everything_runs_on_a_score_net():
    torch.manual_seed(0)
    net = ScoreNet(NetConfig(image_shape=(1, 8, 8), channels=(8, 16))).eval()
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)  # the untrained head is zero: make the score non-trivial
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for solver in ("euler", "heun", "adaptive"):
        r = pf_ode_log_likelihood(net, x, steps=3, probes=2, solver=solver, rtol=1e-2, atol=1e-2, generator=g)
        assert r["nats"].shape == r["bpd"].shape == (3,) and torch.isfinite(r["bpd"]).all()
    for lid in (flipd(net, x, 0.05, probes=2, generator=g), flipd(net, x, 0.05, exact=True)):
        assert lid.shape == (3,) and torch.isfinite(lid).all()
    lid, sv = normal_bundle_lid(net, x, n_perturb=80, generator=g)
    assert lid.shape == (3,) and sv.shape == (3, 64) and torch.isfinite(sv).all()
    assert score_norm(net, x, 0.01).shape == (3,)
    err = reconstruction_error(net, x, sigmas=(0.1, 0.5), steps=3, generator=g)
    assert err.shape == (3, 2) and torch.isfinite(err).all()
