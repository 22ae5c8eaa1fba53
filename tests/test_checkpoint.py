"""Tests for dgmood.models.checkpoint: round trips, corruption detection, atomic writes, no pickles."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dgmood.models.checkpoint import (
    META,
    STATE,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from dgmood.utils.files import atomic_write, file_sha256, write_json
from dgmood.models.network import NetConfig, ScoreNet
from dgmood.models.train import TrainConfig, train

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


# --- leftovers of killed writes; checksums of the JSON files (issue "faults", distributed part) ------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from dgmood.models.checkpoint import META_SHA  # noqa: E402
from dgmood.utils.files import PROCESS_START  # noqa: E402


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _file(path, age_s=None):
    """Create ``path``; with ``age_s``, last modified that long before this process started."""
    path.write_bytes(b"partial")
    if age_s is not None:
        os.utime(path, (PROCESS_START - age_s, PROCESS_START - age_s))
    return path.name


def _leftovers(directory):
    """Temporaries of killed writes (old, or of dead writers) and files that must survive a cleanup."""
    dead, alive = _dead_pid(), os.getppid()
    gone = [
        _file(directory / f".{META}.{dead}.abcd_123.tmp", 60),  # atomic_write of checkpoint.json, writer dead
        _file(directory / f"..{WEIGHTS}.new.{dead}.k2j4h5g6.tmp", 60),  # atomic_write of a staged file
        _file(directory / f".{META}.x1y2z3w4.tmp", 60),  # an older atomic_write name, without a PID
        _file(directory / ".tmpAb3dE9", 60),  # safetensors' save_file temporary
        _file(directory / f".{META}.{os.getpid()}.abcdefgh.tmp", 60),  # our PID, older than us: an earlier process
    ]
    kept = [
        _file(directory / f".{META}.{alive}.abcdefgh.tmp", 60),  # its writer is alive
        _file(directory / f".{META}.{dead}.newfile1.tmp"),  # written after this process started
        _file(directory / "notes.txt", 60),  # not ours
        _file(directory / ".weights.safetensors.old", 60),
    ]
    return gone, kept


def test_save_removes_leftover_temporaries_only(saved):
    directory, model, ema, opt, gen = saved
    gone, kept = _leftovers(directory)
    save_checkpoint(directory, model, ema, opt, gen, {"step": 3, "log": []})
    names = set(os.listdir(directory))
    assert not names & set(gone), names & set(gone)
    assert set(kept) <= names and {WEIGHTS, STATE, META} <= names
    assert load_model(directory)[1]["step"] == 3


def test_load_removes_leftovers_and_uncommitted_staged_files(saved):
    directory = saved[0]
    gone, kept = _leftovers(directory)
    model, ema, opt, gen = _training_state(seed=1)  # a save killed after staging, before its commit
    save_checkpoint(directory.parent / "other", model, ema, opt, gen, {"step": 9, "log": []})
    staged = directory / f".{WEIGHTS}.new"
    staged.write_bytes((directory.parent / "other" / WEIGHTS).read_bytes())
    os.utime(staged, (PROCESS_START - 60, PROCESS_START - 60))
    gone.append(staged.name)
    recent = _file(directory / f".{STATE}.new")  # maybe another process's save in progress: kept
    assert load_model(directory)[1]["step"] == 2
    names = set(os.listdir(directory))
    assert not names & set(gone), names & set(gone)
    assert set(kept) | {recent, WEIGHTS, STATE, META} <= names


def test_checkpoint_json_carries_a_checksum_of_itself(saved):
    directory = saved[0]
    meta = json.loads((directory / META).read_text())
    assert isinstance(meta[META_SHA], str) and len(meta[META_SHA]) == 64
    meta["step"] = 3  # a hand edit (or a damaged digit) that leaves valid JSON
    (directory / META).write_text(json.dumps(meta))
    for load in (lambda: load_model(directory), lambda: load_checkpoint(directory, *_fresh())):
        with pytest.raises(CheckpointError, match=f"does not match its {META_SHA}.*restore it or retrain") as err:
            load()
        assert len(str(err.value).splitlines()) == 1
    # a checkpoint from before checksums (no field) loads, and so does a deliberate edit with the field removed
    del meta[META_SHA]
    (directory / META).write_text(json.dumps(meta))
    assert load_model(directory)[1]["step"] == 3
    assert load_checkpoint(directory, *_fresh())["step"] == 3


def _saved_detector(directory):
    from dgmood.detectors.estimators import KNNDetector
    from dgmood.detectors.persist import save_detector

    det = KNNDetector(n_neighbors=3).fit(np.random.default_rng(0).normal(size=(40, 4)))
    save_detector(det, directory, meta={"model_sha256": "a" * 64})
    return det


def test_detector_json_carries_a_checksum_of_itself(tmp_path):
    from dgmood.detectors.persist import DETECTOR_SHA, load_detector

    det = _saved_detector(tmp_path)
    path = tmp_path / "detector.json"
    info = json.loads(path.read_text())
    assert isinstance(info[DETECTOR_SHA], str) and len(info[DETECTOR_SHA]) == 64
    # the provenance is not covered: readers compare it with the run (stale → refit / "other weights")
    info["meta"]["model_sha256"] = "b" * 64
    path.write_text(json.dumps(info))
    assert load_detector(tmp_path)[1]["model_sha256"] == "b" * 64
    # the fitted values are
    info["fitted"]["offset_"] = info["fitted"]["offset_"] + 1.0
    path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=f"{DETECTOR_SHA}.*rerun `dgmood fit`") as err:
        load_detector(tmp_path)
    assert len(str(err.value).splitlines()) == 1
    # a detector saved before checksums (no field) loads as it is
    del info[DETECTOR_SHA]
    path.write_text(json.dumps(info))
    loaded, _ = load_detector(tmp_path)
    assert loaded.offset_ == det.offset_ + 1.0


def test_detector_save_and_load_remove_leftovers(tmp_path):
    from dgmood.detectors.persist import load_detector

    _saved_detector(tmp_path)
    gone, kept = _leftovers(tmp_path)
    load_detector(tmp_path)
    names = set(os.listdir(tmp_path))
    assert not names & set(gone) and set(kept) <= names


@pytest.mark.parametrize("term_shape,extreme_weight", [("linear", 0.0), ("softplus", 0.0), ("softplus", 1.0)])
def test_combined_detector_with_a_hinge_column_saves_and_loads_the_same_scores(tmp_path, term_shape, extreme_weight):
    from dgmood.detectors.estimators import CombinedDetector
    from dgmood.detectors.persist import load_detector, save_detector

    rng = np.random.default_rng(3)
    X = np.column_stack([rng.standard_normal((300, 3)), rng.standard_normal(300), rng.lognormal(size=300)])
    det = CombinedDetector(distance_columns=1, hinge_columns=1, component_grid=(1, 2), cv=2,
                           term_shape=term_shape, extreme_weight=extreme_weight).fit(X)
    save_detector(det, tmp_path, meta={"model_sha256": "a" * 64})
    loaded, _ = load_detector(tmp_path)
    assert loaded.hinge_columns == 1 and loaded.gmm_.means_.shape[1] == 3 and loaded.term_shape == term_shape
    assert loaded.extreme_weight == extreme_weight and hasattr(loaded, "extreme_mean_") == (extreme_weight > 0)
    np.testing.assert_allclose(loaded.score_samples(X), det.score_samples(X), rtol=1e-6)
