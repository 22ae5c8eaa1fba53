"""Tests for dgmood.models.network: shapes, σ scaling, input checks, functorch transforms, config round trip."""

import json

import pytest
import torch
from conftest import random_head_net

from dgmood.models.network import NetConfig, ScoreNet

# torch.func imports parts of torch that still call torch.jit.script internally
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")



_net = random_head_net


def _inputs(shape, n=3, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g, dtype=dtype)
    sigma = torch.logspace(-2, 0, n, dtype=dtype)
    return x, sigma


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 27, 29), (2, 9, 7)])
def test_output_shape_equals_input_shape(shape):
    net = _net(shape)
    x, sigma = _inputs(shape)
    with torch.no_grad():
        out = net.scaled_score(x, sigma)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_default_config_shape():
    net = ScoreNet().eval()
    x, sigma = _inputs((1, 28, 28), n=2)
    with torch.no_grad():
        out = net.scaled_score(x, sigma)
    assert out.shape == x.shape
    # the head starts at zero: an untrained model predicts σ·s = 0 (the DSM loss starts at D/2)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 27, 29)])
def test_forward_is_scaled_score_over_sigma(shape):
    net = _net(shape, dtype=torch.float64)
    x, sigma = _inputs(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), net.scaled_score(x, sigma) / sigma[:, None, None, None],
                                   rtol=1e-12, atol=0)


def test_per_sample_independence():
    # GroupNorm normalises per sample: an image's output does not depend on its batch mates or order
    shape = (1, 27, 29)
    net = _net(shape, dtype=torch.float64)
    x, sigma = _inputs(shape, n=4, dtype=torch.float64)
    with torch.no_grad():
        full = net.scaled_score(x, sigma)
        single = net.scaled_score(x[2:3], sigma[2:3])
        flipped = net.scaled_score(x.flip(0), sigma.flip(0)).flip(0)
    torch.testing.assert_close(single, full[2:3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flipped, full, rtol=1e-10, atol=1e-12)


def test_sigma_conditioning_matters():
    shape = (1, 8, 8)
    net = _net(shape, dtype=torch.float64)
    x, _ = _inputs(shape, n=1, dtype=torch.float64)
    with torch.no_grad():
        a = net.scaled_score(x, torch.tensor([0.01], dtype=torch.float64))
        b = net.scaled_score(x, torch.tensor([1.0], dtype=torch.float64))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [(1, 27, 28), (3, 28, 28), (1, 28, 29)])
def test_wrong_input_shape_raises(bad):
    net = _net((1, 28, 28))
    x, sigma = _inputs(bad, n=2)
    with pytest.raises(ValueError, match="shape"):
        net.scaled_score(x, sigma)
    with pytest.raises(ValueError):
        net(x, sigma)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 27, 29)])
def test_jvp_and_vjp_through_scaled_score(shape):
    net = _net(shape, dtype=torch.float64)
    x, sigma = _inputs(shape, n=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    u = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def f(z):
        return net.scaled_score(z, sigma)

    out_j, jv = torch.func.jvp(f, (x,), (v,))
    out_v, vjp_fn = torch.func.vjp(f, x)
    (jtu,) = vjp_fn(u)
    with torch.no_grad():
        ref = f(x)
    torch.testing.assert_close(out_j, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_v, ref, rtol=1e-12, atol=1e-14)
    assert jv.shape == x.shape and jtu.shape == x.shape
    # central finite difference of F along v
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=1e-5, atol=1e-7)
    # adjoint identity <u, J v> = <Jᵀ u, v>
    assert (u * jv).sum().item() == pytest.approx((jtu * v).sum().item(), rel=1e-10)
    assert jv.abs().max() > 0


def test_exact_jacobian_trace_via_jvp_matches_autograd():
    # the FLIPD use case: tr ∇ₓF by forward-mode basis probes equals the autograd Jacobian's trace
    shape = (1, 4, 4)
    net = _net(shape, channels=(8, 16), dtype=torch.float64)
    x, sigma = _inputs(shape, n=1, dtype=torch.float64)

    def f(z):
        return net.scaled_score(z.reshape(1, *shape), sigma).reshape(-1)

    flat = x.reshape(-1)
    basis = torch.eye(flat.numel(), dtype=torch.float64)
    cols = torch.func.vmap(lambda e: torch.func.jvp(f, (flat,), (e,))[1])(basis)
    jac = torch.autograd.functional.jacobian(f, flat)
    torch.testing.assert_close(cols.T, jac, rtol=1e-10, atol=1e-12)
    assert torch.trace(cols).item() == pytest.approx(torch.trace(jac).item(), rel=1e-10)


def test_net_config_json_round_trip():
    cfg = NetConfig(image_shape=(3, 32, 32), channels=(32, 64), patch=1, emb_dim=16, sigma_data=0.4)
    back = NetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.image_shape, tuple) and isinstance(back.channels, tuple)
    assert hash(back) == hash(cfg)
    assert NetConfig.from_dict(json.loads(json.dumps(NetConfig().to_dict()))) == NetConfig()
    # a model built from the round-tripped config accepts the original's weights
    torch.manual_seed(0)
    a = ScoreNet(cfg)
    ScoreNet(back).load_state_dict(a.state_dict())


def test_patch_one_works():
    shape = (1, 7, 9)
    torch.manual_seed(0)
    net = ScoreNet(NetConfig(image_shape=shape, channels=(8, 16), patch=1, emb_dim=8)).eval()
    x, sigma = _inputs(shape)
    with torch.no_grad():
        assert net.scaled_score(x, sigma).shape == x.shape
