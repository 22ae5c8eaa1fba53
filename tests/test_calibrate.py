"""Tests for dgmood.statistics.calibrate (METHODS §3): exact τ, log-bisection of σ₀, the target, the record."""

import json
import math

import numpy as np
import pytest
import torch

from dgmood.statistics.calibrate import (
    CALIBRATION_POINTS, Calibration, bisect_log, calibrate_sigma0, calibrate_tau, calibration_points,
    first_crossing, mean_lid_at_tau, target_lid,
)
from dgmood.statistics.flipd import calibrate_flipd
from dgmood.models.diffusion import flipd
from dgmood.statistics.lpca import mean_lpca
from dgmood.data.toy import embedded_gaussian

# --- τ ------------------------------------------------------------------------------------------------------------


def _random_singular_values(n=20, r=8, seed=0, round_to=None):
    s = np.sort(np.random.default_rng(seed).lognormal(0.0, 2.0, (n, r)), axis=1)[:, ::-1].copy()
    return np.round(s, round_to) if round_to is not None else s  # rounding makes ties across and within points


def _brute_force(s, target, kind, dim=None):
    """Best achievable |mean LID − target| over every candidate τ: below, at and between the distinct values."""
    u = np.unique(s)
    candidates = np.concatenate([[u[0] - 1.0], u, (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    means = np.array([mean_lid_at_tau(s, t, kind, dim) for t in candidates])
    return np.abs(means - target).min(), candidates, means


@pytest.mark.parametrize("kind, dim", [("flow", None), ("normal_bundle", None), ("normal_bundle", 12)])
@pytest.mark.parametrize("round_to", [None, 0])
def test_calibrate_tau_is_as_good_as_brute_force(kind, dim, round_to):
    # Exact agreement (to 1e-12) of the achieved error with the best over all candidate τ, for targets inside,
    # between the steps of, and outside the achievable range.
    s = _random_singular_values(round_to=round_to)
    for target in np.linspace(-1.0, 13.0, 57):
        tau = calibrate_tau(s, target, kind, dim)
        best, candidates, means = _brute_force(s, target, kind, dim)
        achieved = mean_lid_at_tau(s, tau, kind, dim)
        assert abs(abs(achieved - target) - best) < 1e-12
        # ties go to the larger τ: no candidate with a larger τ is as close
        assert not np.any((candidates > tau) & (np.abs(means - target) <= best + 1e-9) & (means != achieved))


def test_calibrate_tau_accepts_torch_and_returns_a_threshold_strictly_inside_its_step():
    s = _random_singular_values(n=5, r=6, seed=3)
    for target in (0.5, 2.2, 4.0):
        tau = calibrate_tau(torch.tensor(s), target)
        assert isinstance(tau, float) and not np.any(np.isclose(s, tau, rtol=1e-9, atol=0))
        below, above = s[s < tau].max(), s[s > tau].min()
        assert tau == pytest.approx(math.sqrt(below * above))  # geometric mean of the step's edges


def test_calibrate_tau_tie_rule_and_ends():
    s = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    # mean LID 2 on [1, 2) and 1 on [2, 3): 1.5 is a tie, the larger τ (√6, LID 1) wins
    assert calibrate_tau(s, 1.5) == pytest.approx(math.sqrt(6.0))
    assert mean_lid_at_tau(s, calibrate_tau(s, 1.5)) == 1.0
    # normal bundle: LID = 3 − count, so the same tie gives LID 2 (fewer values counted as normal)
    assert mean_lid_at_tau(s, calibrate_tau(s, 1.5, "normal_bundle"), "normal_bundle") == 2.0
    assert calibrate_tau(s, 10.0) == 0.5  # every value counts: half the smallest
    assert calibrate_tau(s, -1.0) == 6.0  # none counts: twice the largest
    zeros = np.zeros((2, 3))
    assert mean_lid_at_tau(zeros, calibrate_tau(zeros, 3.0), "flow") == 3.0  # τ < 0 when the smallest value is 0


def test_calibrate_tau_normal_bundle_uses_the_ambient_dimension():
    s = np.array([[10.0, 9.0, 0.1], [11.0, 8.0, 0.2]])  # K = 3 perturbations in D = 50
    tau = calibrate_tau(s, 48.0, "normal_bundle", dim=50)
    assert 0.2 < tau < 8.0 and mean_lid_at_tau(s, tau, "normal_bundle", dim=50) == 48.0


@pytest.mark.parametrize("args, match", [
    ((np.ones((2, 3)), 1.0, "jacobian"), "kind must be"),
    ((np.ones(3), 1.0), "shape"),
    ((np.ones((0, 3)), 1.0), "shape"),
    ((np.array([[1.0, np.nan]]), 1.0), "NaN"),
    ((np.ones((2, 3)), 1.0, "normal_bundle", 2), "ambient dimension"),
    ((np.ones((2, 3)), float("nan")), "finite"),
])
def test_calibrate_tau_errors(args, match):
    with pytest.raises(ValueError, match=match):
        calibrate_tau(*args)


# --- bisection ----------------------------------------------------------------------------------------------------


class Counting:
    """fn(x) = 10 − 3 ln x (decreasing), counting calls."""

    def __init__(self, fn=lambda x: 10.0 - 3.0 * math.log(x)):
        self.fn, self.calls = fn, 0

    def __call__(self, x: float) -> float:
        self.calls += 1
        return self.fn(x)


@pytest.mark.parametrize("target, tol", [(4.0, 1e-6), (12.5, 1e-3), (0.0, 0.5)])
def test_bisection_reaches_the_target_within_tolerance(target, tol):
    fn = Counting()
    x, fx = bisect_log(fn, target, 1e-3, 1e3, tol=tol)
    assert abs(fx - target) <= tol and fx == fn.fn(x)
    assert x == pytest.approx(math.exp((10.0 - target) / 3.0), rel=tol)  # tol in f is tol/3 in log x
    # log-bisection: the bracket of width ln 1e6 ≈ 13.8 shrinks to 2 tol/3 in ⌈log2(13.8 / (2 tol / 3))⌉ halvings
    assert fn.calls <= 2 + math.ceil(math.log2(13.8 / (2 * tol / 3)))


def test_bisection_returns_an_end_already_on_target():
    fn = Counting()
    assert bisect_log(fn, 10.0, 1.0, 5.0) == (1.0, 10.0) and fn.calls == 2


@pytest.mark.parametrize("fn, lo, hi, match", [
    (lambda x: 10.0 - 3.0 * math.log(x), 1e-3, 1e-2, "raise hi"),  # target 4 is below f on all of [lo, hi]
    (lambda x: 10.0 - 3.0 * math.log(x), 1e3, 1e4, "lower lo"),
    (lambda x: 3.0 * math.log(x), 1e-3, 1e3, "increases"),
    (lambda x: math.nan, 1e-3, 1e3, "not finite"),
])
def test_bisection_errors_say_what_to_do(fn, lo, hi, match):
    with pytest.raises(ValueError, match=match):
        bisect_log(fn, 4.0, lo, hi, tol=0.01)


def _bump(x: float) -> float:
    """Decreasing from ≈ 7.9 at 1e-3 to ≈ 2 at 1e3, plus a bump of 10 at x = 1, where the first midpoint lands."""
    return 2.0 + 6.0 / (1.0 + x) + 10.0 * math.exp(-4.0 * math.log(x) ** 2)


def test_bisection_detects_a_non_monotone_curve_or_finds_a_crossing_anyway():
    with pytest.raises(ValueError, match="not decreasing"):
        bisect_log(_bump, 4.0, 1e-3, 1e3, tol=0.01)
    x, fx = bisect_log(_bump, 4.0, 1e-3, 1e3, tol=0.01, check_monotone=False)
    assert abs(fx - 4.0) <= 0.01 and _bump(x) == fx and x > 1.0  # the bracket stays valid: a crossing right of 1


def test_bisection_runs_out_of_iterations_on_a_jump():
    step = lambda x: 10.0 if x < 1.0 else 0.0
    with pytest.raises(ValueError, match="raise max_iter or tol"):
        bisect_log(step, 5.0, 1e-2, 1e2, tol=0.1, max_iter=30)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lo=0.0, hi=1.0), "0 < lo < hi"),
    (dict(lo=2.0, hi=1.0), "0 < lo < hi"),
    (dict(lo=1.0, hi=2.0, tol=-1.0), "tol >= 0"),
])
def test_bisection_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bisect_log(lambda x: 0.0, 1.0, **kwargs)


# --- σ₀ of FLIPD on an analytic score -----------------------------------------------------------------------------

D, d, ETA = 16, 3, 1e-3


class ThickGaussian:
    """Pixels 0.5 + 0.1·(embedded Gaussian, d = 3 in D = 16) + η ε; smoothed score −(C + σ²I)⁻¹(x − 0.5), exact."""

    def __init__(self):
        a = np.eye(d)[np.arange(D) % d]
        lam, u = np.linalg.eigh(0.01 * a @ a.T + ETA**2 * np.eye(D))
        self.lam, self.u = torch.tensor(lam), torch.tensor(u)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        noise = ETA * np.random.default_rng(seed + 1).standard_normal((n, D))
        x = 0.5 + 0.1 * embedded_gaussian(n, d, D, seed=seed) + noise
        return torch.tensor(x).view(n, 1, 4, 4)

    def __call__(self, x, sigma):
        z = (x.flatten(1) - 0.5) @ self.u / (self.lam + sigma[:, None] ** 2)
        return -(z @ self.u.T).view_as(x)


@pytest.mark.parametrize("target", [12.0, float(d), 1.0])
@pytest.mark.parametrize("exact", [True, False])
def test_calibrate_sigma0_on_flipd_with_an_analytic_score(target, exact):
    # Targets above, on and below the plateau at d; Hutchinson (one Rademacher probe, the same seed every call)
    # or the exact trace. Tolerance 0.05 dimensions, checked by a fresh evaluation at the returned σ₀.
    g = ThickGaussian()
    x = g.sample(CALIBRATION_POINTS, seed=0)

    def mean_lid(sigma0: float) -> float:
        gen = torch.Generator().manual_seed(0)
        return flipd(g, x, sigma0, exact=exact, generator=gen).mean().item()

    sigma0 = calibrate_sigma0(mean_lid, target, 1e-6, 10.0, tol=0.05)
    assert 1e-6 < sigma0 < 10.0
    assert abs(mean_lid(sigma0) - target) <= 0.05


def test_calibration_end_to_end_on_flipd_generalises_to_held_out_points():
    # METHODS §3 with FLIPD: the target is the mean LPCA of the training images (= d exactly: noise variance η² is
    # 2e-5 of the tangent variances, below α = 1e-3), σ₀ is matched on 80 training points, and held-out points then
    # match d in mean within 0.05 + 3 standard errors (the calibrated mean is within tol = 0.05 of d), and every
    # point within 0.3: FLIPD's per-point spread at the σ₀ found (≈ 0.024) has std ≈ 0.03, the largest deviations
    # (≈ 0.2 of 200) at points far out along the data, where σ₀² (Uᵀx)²/λ² grows.
    g = ThickGaussian()
    train = g.sample(1000, seed=2)
    target = target_lid(train.numpy(), n_neighbors=100, n_queries=100)
    assert target == d
    x = train[calibration_points(len(train))]
    sigma0 = calibrate_sigma0(lambda s: flipd(g, x, s, exact=True).mean().item(), target, 1e-6, 10.0, tol=0.05)
    held_out = flipd(g, g.sample(200, seed=3), sigma0, exact=True)
    assert abs(held_out.mean().item() - d) < 0.05 + 3 * held_out.std().item() / math.sqrt(200)
    assert torch.all((held_out - d).abs() < 0.3)


def test_calibrate_sigma0_rejects_an_unbracketed_target():
    g = ThickGaussian()
    x = g.sample(10, seed=0)
    with pytest.raises(ValueError, match="lower lo"):  # at σ₀ ≥ 1e-2 the mean LID is ≤ d < 12
        calibrate_sigma0(lambda s: flipd(g, x, s, exact=True).mean().item(), 12.0, 1e-2, 10.0)


class RisingAtLargeSigma(ThickGaussian):
    """The exact score up to σ = 0.5, a tenth of it above: FLIPD's mean LID falls to ~0 and rises again to ~0.9 D,
    like a trained network's on CIFAR-10, least accurate at large σ."""

    def __call__(self, x, sigma):
        score = super().__call__(x.double(), sigma.double()) * torch.where(sigma < 0.5, 1.0, 0.1).view(-1, 1, 1, 1)
        return score.to(x.dtype)


def test_first_crossing_scans_up_from_lo_past_a_dip():
    dip = lambda x: 10.0 - 9.0 * math.exp(-math.log(x) ** 2)  # noqa: E731  # 10 at both ends, 1 at x = 1
    a, b = first_crossing(dip, 5.0, 1e-3, 1e3, points=13)
    assert a < b and dip(a) > 5.0 >= dip(b) and b <= 1.0
    assert first_crossing(dip, 0.5, 1e-3, 1e3) is None
    assert first_crossing(lambda x: 0.0, 1.0, 1e-3, 1.0) == (1e-3, 1e-3)
    with pytest.raises(ValueError, match="lo < hi"):
        first_crossing(dip, 1.0, 1.0, 0.5)


def test_calibrate_flipd_finds_the_first_crossing_when_the_curve_rises_again():
    # Both ends of FLIPD's bracket are above the target (the case of RGB images, issue 27): the first crossing from
    # small σ₀ is returned, below where the score goes wrong, with the target reached; nothing clamped.
    g = RisingAtLargeSigma()
    x = g.sample(CALIBRATION_POINTS, seed=0)
    ends = [flipd(g, x, s, exact=True).mean().item() for s in (1.6e-3, 76.0)]
    assert min(ends) > 2.0
    result = calibrate_flipd(g, x.float().numpy(), 2.0, probes=4)
    assert "clamped" not in result and result["value"] < 0.5
    assert abs(result["achieved"] - 2.0) <= 0.5


# --- target, points, record ---------------------------------------------------------------------------------------


def test_target_lid_flattens_images_and_subsamples():
    x = 0.5 + 0.1 * embedded_gaussian(600, 4, 16, seed=1).reshape(600, 1, 4, 4)
    assert target_lid(x, n_neighbors=50, n_queries=60, seed=3) == 4.0
    noisy = x + 0.05 * np.random.default_rng(0).standard_normal(x.shape) * np.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    expected = mean_lpca(noisy.reshape(600, -1), 50, n_queries=60, seed=3)
    assert target_lid(noisy, n_neighbors=50, n_queries=60, seed=3) == expected
    with pytest.raises(ValueError, match="at least 2 axes"):
        target_lid(np.zeros(5))


def test_calibration_points():
    idx = calibration_points(1000)
    assert idx.shape == (80,) and idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 1000
    np.testing.assert_array_equal(idx, calibration_points(1000, seed=0))
    assert not np.array_equal(idx, calibration_points(1000, seed=1))
    np.testing.assert_array_equal(calibration_points(5, n=5), np.arange(5))
    with pytest.raises(ValueError, match="pass n <= 50"):
        calibration_points(50)
    with pytest.raises(ValueError, match="n >= 1"):
        calibration_points(50, n=0)


def test_calibration_record_round_trips_through_json():
    rec = Calibration(target=np.float64(245.3), parameter="sigma0", value=np.float32(0.02), achieved=245.31,
                      n_points=np.int64(80))
    assert type(rec.target) is float and type(rec.n_points) is int  # numpy scalars coerced
    back = Calibration.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back == rec
    with pytest.raises(ValueError, match="exactly the keys"):
        Calibration.from_dict({**rec.to_dict(), "extra": 1})
    with pytest.raises(AttributeError):
        rec.value = 1.0  # frozen
