"""Tests for dgmood.models.train: a tiny model learns a Gaussian's score; resume and seeding are exact."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dgmood.models.train as train_mod
from dgmood.models.checkpoint import META, STATE, WEIGHTS
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.models.train import (
    TrainConfig, _batch_indices, learning_rate, native_bf16, random_hflip, read_train_log, train,
)

M, S = 0.5, 0.1  # pixels i.i.d. N(M, S²)
SMALL = NetConfig(image_shape=(1, 8, 8), channels=(8, 16), emb_dim=8)



def _gaussian_images(n, seed=0):
    return (M + S * np.random.default_rng(seed).standard_normal((n, 1, 8, 8))).astype(np.float32)


def _relative_error(net, sigma, n=500, seed=1):
    """‖F − F*‖/‖F*‖ on held-out noisy samples, F* = σ·(−(x̃ − M)/(S² + σ²)) the exact scaled score."""
    g = torch.Generator().manual_seed(seed)
    x = M + S * torch.randn((n, 1, 8, 8), generator=g)
    x_noisy = x + sigma * torch.randn(x.shape, generator=g)
    exact = sigma * (-(x_noisy - M) / (S**2 + sigma**2))
    with torch.no_grad():
        pred = net.scaled_score(x_noisy, torch.full((n,), sigma))
    return ((pred - exact).norm() / exact.norm()).item()


# --- (a) learning the score ------------------------------------------------------------------


def test_tiny_net_learns_gaussian_score(tmp_path):
    net_cfg = NetConfig(image_shape=(1, 8, 8), channels=(16, 32), emb_dim=16)
    cfg = TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup=20, ema_decay=0.98, checkpoint_every=300)
    untrained = ScoreNet(net_cfg).eval()
    trained = train(_gaussian_images(2000), tmp_path, net_cfg, cfg, progress=False)
    assert not trained.training
    for sigma in (0.1, 0.3):
        before, after = _relative_error(untrained, sigma), _relative_error(trained, sigma)
        assert before == pytest.approx(1.0)  # zero-initialised head: F = 0
        assert after < 0.35, (sigma, after)
        assert after < before / 2
    log = read_train_log(tmp_path)
    assert [e["step"] for e in log] == [300]
    # the optimum E[loss] is D/2 · E_σ[S²/(S²+σ²)] < D/2 = the untrained loss; the run got below D/2
    assert log[0]["loss"] < 64 / 2


# --- (b) resume is exact ---------------------------------------------------------------------


class _Crash(Exception):
    pass


def _tensors(directory):
    return load_file(str(directory / WEIGHTS)), load_file(str(directory / STATE))


@pytest.mark.parametrize("hflip", [False, True])
def test_resume_is_bitwise_identical(tmp_path, monkeypatch, hflip):
    images = _gaussian_images(64)
    k = 4
    cfg = TrainConfig(steps=2 * k, batch_size=16, warmup=2, checkpoint_every=k, seed=3, hflip=hflip)

    full = train(images, tmp_path / "full", SMALL, cfg, progress=False)

    # the interrupted run: crash right after the checkpoint at step k has been written
    real_save = train_mod.save_checkpoint

    def save_then_crash(directory, model, ema, optimizer, generator, meta):
        real_save(directory, model, ema, optimizer, generator, meta)
        if meta["step"] == k:
            raise _Crash

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        train(images, tmp_path / "resumed", SMALL, cfg, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)

    # resume: only the remaining k steps run
    real_loss, calls = train_mod.training_loss, []

    def counting_loss(*args, **kwargs):
        calls.append(1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_loss", counting_loss)
    resumed = train(images, tmp_path / "resumed", SMALL, cfg, progress=False)
    assert len(calls) == k

    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    (wf, sf), (wr, sr) = _tensors(tmp_path / "full"), _tensors(tmp_path / "resumed")
    assert wf.keys() == wr.keys() and sf.keys() == sr.keys()
    for key in wf:
        assert torch.equal(wf[key], wr[key]), key
    for key in sf:  # raw model, Adam moments and step, generator state
        assert torch.equal(sf[key], sr[key]), key
    log_f, log_r = read_train_log(tmp_path / "full"), read_train_log(tmp_path / "resumed")
    assert [e["step"] for e in log_f] == [e["step"] for e in log_r] == [k, 2 * k]
    assert [e["loss"] for e in log_f] == [e["loss"] for e in log_r]

    # a finished run is not trained further
    calls.clear()
    again = train(images, tmp_path / "resumed", SMALL, cfg, progress=False)
    assert not calls
    for a, b in zip(full.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


# --- (c) seeding -----------------------------------------------------------------------------


def test_fixed_seed_gives_identical_weights(tmp_path):
    images = _gaussian_images(48)
    cfg = TrainConfig(steps=5, batch_size=16, warmup=2, checkpoint_every=5, seed=11)
    a = train(images, tmp_path / "a", SMALL, cfg, progress=False)
    b = train(images, tmp_path / "b", SMALL, cfg, progress=False)
    c = train(images, tmp_path / "c", SMALL, TrainConfig(**{**cfg.__dict__, "seed": 12}), progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.stem.weight, c.stem.weight)
    assert (tmp_path / "a" / META).is_file()


# --- (d) learning-rate schedule --------------------------------------------------------------


def test_random_hflip_mirrors_about_half_of_the_images_reproducibly():
    batch = torch.rand(400, 3, 4, 5)
    out = random_hflip(batch, torch.Generator().manual_seed(0))
    same = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)  # each image either as it was or mirrored (random images are not symmetric)
    assert 150 < int(mirrored.sum()) < 250
    assert torch.equal(out, random_hflip(batch, torch.Generator().manual_seed(0)))


def test_learning_rate_warmup_and_cosine_decay():
    cfg = TrainConfig(steps=1100, lr=2e-3, warmup=100)
    lr = np.array([learning_rate(s, cfg) for s in range(cfg.steps + 50)])
    # linear warm-up: lr·(step+1)/warmup
    np.testing.assert_allclose(lr[:100], 2e-3 * np.arange(1, 101) / 100, rtol=1e-12)
    assert lr[0] == pytest.approx(2e-5) and lr[99] == pytest.approx(2e-3)
    assert np.all(np.diff(lr[:100]) > 0)
    # cosine decay from lr to lr/20, reached at cfg.steps and held afterwards
    assert lr[100] == pytest.approx(2e-3)
    assert lr[600] == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5))  # half way: midpoint of the cosine
    assert lr[1100] == pytest.approx(2e-3 / 20)
    np.testing.assert_allclose(lr[1100:], 2e-3 / 20, rtol=1e-12)
    assert np.all(np.diff(lr[100:]) <= 1e-18)
    p = (350 - 100) / 1000
    assert lr[350] == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))))
    assert lr.max() == pytest.approx(2e-3) and lr.min() > 0


def test_learning_rate_edge_cases():
    no_warmup = TrainConfig(steps=10, lr=1.0, warmup=0)
    assert learning_rate(0, no_warmup) == pytest.approx(1.0)
    assert learning_rate(10, no_warmup) == pytest.approx(0.05)
    long_warmup = TrainConfig(steps=10, lr=1.0, warmup=20)  # warm-up longer than the run
    assert learning_rate(9, long_warmup) == pytest.approx(0.5)


# --- data order ------------------------------------------------------------------------------


def test_batch_indices_are_seeded_epoch_permutations():
    n, bs = 50, 10
    epoch0 = np.concatenate([_batch_indices(n, bs, s, seed=0) for s in range(5)])
    epoch1 = np.concatenate([_batch_indices(n, bs, s, seed=0) for s in range(5, 10)])
    assert sorted(epoch0) == list(range(n)) == sorted(epoch1)  # every image once per epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    np.testing.assert_array_equal(_batch_indices(n, bs, 7, seed=0), _batch_indices(n, bs, 7, seed=0))
    assert not np.array_equal(_batch_indices(n, bs, 7, seed=0), _batch_indices(n, bs, 7, seed=1))
    # fewer images than a batch: the batch is the whole (shuffled) set
    assert sorted(_batch_indices(6, 10, 3, seed=0)) == list(range(6))
    # a ragged tail is dropped, never a short batch
    assert all(len(_batch_indices(55, 10, s, seed=0)) == 10 for s in range(20))


def test_ema_decay_warms_up_then_caps():
    from dgmood.models.train import ema_decay

    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(90, 0.999) == pytest.approx(0.91)
    assert ema_decay(100_000, 0.999) == 0.999
    weights_on_init = np.prod([ema_decay(t, 0.999) for t in range(1500)])
    assert weights_on_init < 1e-6  # a 1500-step run's EMA has forgotten the random initial weights


def test_mixed_precision_trains_close_to_fp32(tmp_path):
    """bf16 autocast (``--amp``) runs on CPU too: same data and draws, the loss curve stays within a few
    percent of fp32 (bf16 keeps 8 bits of mantissa) and the weights stay fp32."""
    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 8, 8), dtype=np.float32)
    cfg = TrainConfig(steps=6, batch_size=16, warmup=1, checkpoint_every=3)
    net = NetConfig(image_shape=(1, 8, 8), channels=(8, 16))
    train(images, tmp_path / "fp32", net, cfg, progress=False)
    model = train(images, tmp_path / "amp", net, replace(cfg, amp=True), progress=False)
    fp32, amp = read_train_log(tmp_path / "fp32"), read_train_log(tmp_path / "amp")
    for a, b in zip(fp32, amp):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_native_bf16_is_a_property_of_the_device():
    assert native_bf16("meta") is False
    assert native_bf16("cpu") is any(bool(getattr(torch.cpu, f, lambda: False)())
                                     for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is False
