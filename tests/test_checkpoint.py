"""Tests for dgmood.checkpoint: round trips, corruption detection, atomic writes, no pickles."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dgmood.checkpoint import (
    META,
    STATE,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from dgmood.files import atomic_write, file_sha256, write_json
from dgmood.network import NetConfig, ScoreNet
from dgmood.train import TrainConfig, train

CFG = NetConfig(image_shape=(1, 8, 8), channels=(8, 16), emb_dim=8)



def _training_state(seed=0, cfg=CFG):
    """A model after two Adam steps, an EMA that differs from it, and an advanced generator."""
    torch.manual_seed(seed)
    model = ScoreNet(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.rand((4, *cfg.image_shape), generator=gen)
        sigma = torch.rand(4, generator=gen) + 0.1
        loss = (model.scaled_score(x, sigma) + x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 0.5)
    return model, ema, opt, gen


def _fresh(seed=123, cfg=CFG):
    torch.manual_seed(seed)
    model = ScoreNet(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, ema, torch.optim.Adam(model.parameters(), lr=5.0), torch.Generator().manual_seed(seed)


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def saved(tmp_path):
    model, ema, opt, gen = _training_state()
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, model, ema, opt, gen, {"step": 2, "log": [{"step": 2, "loss": 1.0}]})
    return directory, model, ema, opt, gen


def test_load_model_returns_ema_weights(saved):
    directory, model, ema, _, _ = saved
    loaded, meta = load_model(directory)
    assert not loaded.training
    assert loaded.config == CFG
    _assert_state_equal(loaded.state_dict(), ema.state_dict())
    assert not torch.equal(loaded.stem.weight, model.stem.weight)  # the EMA, not the raw model
    assert meta["step"] == 2 and meta["log"] == [{"step": 2, "loss": 1.0}]
    assert meta["sha256"][WEIGHTS] == file_sha256(directory / WEIGHTS)


def test_load_checkpoint_restores_everything(saved):
    directory, model, ema, opt, gen = saved
    m2, e2, o2, g2 = _fresh()
    meta = load_checkpoint(directory, m2, e2, o2, g2)
    assert meta["step"] == 2
    _assert_state_equal(m2.state_dict(), model.state_dict())
    _assert_state_equal(e2.state_dict(), ema.state_dict())
    assert torch.equal(g2.get_state(), gen.get_state())
    s1, s2 = opt.state_dict(), o2.state_dict()
    # JSON turns the betas tuple into a list; Adam only unpacks it
    assert json.loads(json.dumps(s1["param_groups"])) == json.loads(json.dumps(s2["param_groups"]))
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
            assert s1["state"][i][k].shape == s2["state"][i][k].shape
    # one more identical step from both states gives bitwise identical weights
    for m, o, g in ((model, opt, gen), (m2, o2, g2)):
        x = torch.rand((4, *CFG.image_shape), generator=g)
        sigma = torch.rand(4, generator=g) + 0.1
        o.zero_grad()
        (m.scaled_score(x, sigma) + x).square().mean().backward()
        o.step()
    _assert_state_equal(m2.state_dict(), model.state_dict())


def test_corrupt_weights_detected(saved):
    directory = saved[0]
    path = directory / WEIGHTS
    data = bytearray(path.read_bytes())
    for i in (len(data) - 5, len(data) // 2):  # flip bits in the tensor data
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors") as err:
        load_model(directory)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        load_checkpoint(directory, *_fresh())


def test_corrupt_state_detected(saved):
    directory = saved[0]
    path = directory / STATE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(directory, *_fresh())
    assert str(path) in str(err.value)


def test_swapped_files_detected(saved):
    directory = saved[0]
    other = directory.parent / "other"
    model, ema, opt, gen = _training_state(seed=1)
    save_checkpoint(other, model, ema, opt, gen, {"step": 2, "log": []})
    (directory / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())  # valid safetensors, wrong run
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(directory)


def test_truncated_json(saved):
    directory = saved[0]
    text = (directory / META).read_text()
    (directory / META).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(directory)
    with pytest.raises(CheckpointError, match="checkpoint.json"):
        load_checkpoint(directory, *_fresh())


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="dgmood train"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(CheckpointError, match="dgmood train"):
        load_checkpoint(tmp_path, *_fresh())


def test_missing_weights_file(saved):
    directory = saved[0]
    (directory / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(directory)


def test_different_net_config_rejected(saved):
    directory = saved[0]
    other = NetConfig(image_shape=(1, 8, 8), channels=(8, 32), emb_dim=8)
    with pytest.raises(CheckpointError, match="network"):
        load_checkpoint(directory, *_fresh(cfg=other))
    # the JSON's network description edited to disagree with the (verified) weights
    meta = json.loads((directory / META).read_text())
    meta["net"] = other.to_dict()
    (directory / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(directory)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")

    def failing(p):
        p.write_text("partial new cont")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


def test_atomic_write_success_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "f.json"  # parent created on demand
    atomic_write(path, lambda p: p.write_text("v1"))
    write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def _assert_no_pickles(directory):
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([WEIGHTS, STATE, META])
    for p in directory.iterdir():
        head = p.read_bytes()[:4]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # pickle / torch.save zip
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                assert len(list(f.keys())) > 0
        else:
            json.loads(p.read_text())


def test_checkpoint_folder_holds_no_pickle(saved):
    _assert_no_pickles(saved[0])


def test_trained_checkpoint_folder_holds_no_pickle(tmp_path):
    images = np.random.default_rng(0).random((32, 1, 8, 8)).astype(np.float32)
    cfg = TrainConfig(steps=3, batch_size=8, warmup=1, checkpoint_every=2)
    train(images, tmp_path, CFG, cfg, progress=False, data_name="toy")
    _assert_no_pickles(tmp_path)
    _, meta = load_model(tmp_path)
    assert meta["step"] == 3 and meta["data"] == "toy"
    assert [e["step"] for e in meta["log"]] == [2, 3]
    assert meta["train"] == json.loads(json.dumps(cfg.__dict__))
