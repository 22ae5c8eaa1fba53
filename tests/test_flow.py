"""The multiscale spline image flow: exact inverse, exact log-det, Jacobian LID, training and checkpoints."""

import math

import numpy as np
import pytest
import torch

from dgmood.models.checkpoint import load_model
from dgmood.models.flow import (
    FlowConfig, ImageFlow, bits_per_dim, dequantize, flow_loss, jacobian_singular_values, lid_from_singular_values,
)
from dgmood.models.registry import config_from_dict
from dgmood.models.train import TrainConfig, train

SMALL = FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=16)


def _random_flow(config=SMALL, seed=0) -> ImageFlow:
    """A flow initialised on a batch and then perturbed, so no layer is the identity."""
    torch.manual_seed(seed)
    flow = ImageFlow(config)
    flow.train()
    flow(torch.rand(32, *config.image_shape) * 0.9 + 0.05)
    flow.eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow.double()


def _images(n=4, shape=(1, 8, 8), seed=1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.98 + 0.01


def test_inverse_recovers_images():
    flow, x = _random_flow(), _images()
    z, _ = flow(x)
    assert z.shape == (4, 64)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-9, rtol=0)


def test_log_det_matches_slogdet_of_the_jacobian():
    flow, x = _random_flow(), _images(1)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0][0], x).reshape(64, 64)
    _, logdet = flow(x)
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)


def test_log_prob_is_a_normalised_density_in_one_dimension_per_pixel():
    # a 1×2×2 image flow: integrate exp(log p) over a grid in [0,1]^4 by Monte Carlo
    cfg = FlowConfig(image_shape=(1, 2, 2), levels=1, steps=1, hidden=4)
    flow = _random_flow(cfg)
    u = torch.rand(200_000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        integral = flow.log_prob(u).exp().mean().item()
    assert integral == pytest.approx(1.0, rel=0.05)


def test_jacobian_singular_values_match_autograd():
    flow, x = _random_flow(), _images(2)
    sv = jacobian_singular_values(flow, x, chunk_size=16)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i]).reshape(64, 64)
        expected = torch.linalg.svdvals(torch.linalg.inv(jac))
        torch.testing.assert_close(sv[i], expected, rtol=1e-7, atol=1e-10)


def test_lid_counts_singular_values_above_tau():
    sv = torch.tensor([[5.0, 2.0, 1.0, 0.1], [0.5, 0.4, 0.3, 0.2]])
    assert lid_from_singular_values(sv, 0.9).tolist() == [3.0, 0.0]
    assert lid_from_singular_values(sv, 0.0).tolist() == [4.0, 4.0]


def test_bits_per_dim_of_the_uniform_density_is_eight():
    assert bits_per_dim(torch.zeros(3), 784).tolist() == pytest.approx([8.0] * 3)


def test_dequantize_stays_inside_the_bin():
    x = torch.tensor([0.0, 1.0, 128 / 255])
    assert dequantize(x).tolist() == pytest.approx([0.5 / 256, 255.5 / 256, 128.5 / 256])
    noisy = dequantize(x.repeat(1000), torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() < 1
    assert ((noisy * 256).floor() == (x.repeat(1000) * 255).round()).all()


def test_config_round_trips_through_its_dict():
    assert config_from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="divisible"):
        ImageFlow(FlowConfig(image_shape=(1, 6, 6)))


def test_wrong_image_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="given to a flow"):
        _random_flow()(torch.rand(2, 1, 4, 4, dtype=torch.float64))


def test_training_lowers_bits_per_dim_and_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    # images with structure: a bright square on a dark background plus a little noise
    images = np.clip(rng.normal(0.1, 0.05, (512, 1, 8, 8)), 0, 1).astype(np.float32)
    images[:, :, 2:6, 2:6] += 0.7
    cfg = TrainConfig(steps=60, batch_size=64, lr=3e-3, warmup=5, checkpoint_every=30)
    model = train(images.clip(0, 1), tmp_path / "ckpt", SMALL, cfg, progress=False)
    loaded, meta = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, ImageFlow) and meta["step"] == 60
    log = meta["log"]
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    x = torch.from_numpy(images[:8].clip(0, 1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(dequantize(x)), model.log_prob(dequantize(x)))
    loss = flow_loss(loaded, x, torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    assert math.isfinite(float(loaded.sample(2).sum()))
