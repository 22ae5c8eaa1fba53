"""The score network run by ONNX Runtime: the same outputs as the module, forward passes only, chosen by the
detector's runtime; FLIPD's difference trace against the autograd one on a real network."""

import numpy as np
import pytest
import torch
from conftest import random_head_net

from dgmood.methods.recipes import build_detector
from dgmood.models.diffusion import flipd
from dgmood.models.exported import OnnxScoreNet, resolve_runtime
from dgmood.models.flow import FlowConfig
from dgmood.models.registry import build_model
from dgmood.statistics.feature_knn import FeatureKNN
from dgmood.statistics.reconstruction import Reconstruction
from dgmood.statistics.score_norms import ScoreNorms


def _net(shape):
    return random_head_net(shape, channels=(8, 16))


@pytest.fixture(scope="module")
def fashion(data_dir):
    from dgmood.data.datasets import load_images

    return load_images("fashion-mnist:test[:300]", data_dir)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 27, 29)])
def test_exported_network_equals_the_module(shape):
    net = _net(shape)
    exported = OnnxScoreNet(net, max_batch=4)
    x = torch.rand(10, *shape, generator=torch.Generator().manual_seed(1))  # 10 > max_batch: run in pieces
    sigma = torch.logspace(-2, 0, 10)
    with torch.no_grad():
        out, mid = net.scaled_score_and_mid(x, sigma)
    got, got_mid = exported.scaled_score_and_mid(x, sigma)
    assert got.shape == x.shape and got_mid.shape == mid.shape
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mid, mid, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exported(x, sigma) * sigma[:, None, None, None], out, rtol=1e-4, atol=1e-5)


def test_exported_network_refuses_gradients_and_wrong_shapes():
    exported = OnnxScoreNet(_net((1, 8, 8)))
    with pytest.raises(ValueError, match="forward passes only"):
        exported.scaled_score(torch.rand(2, 1, 8, 8, requires_grad=True), torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="shape"):
        exported.scaled_score(torch.rand(2, 1, 9, 8), torch.full((2,), 0.1))


def test_runtime_choice():
    net, flow = _net((1, 8, 8)), build_model(FlowConfig(image_shape=(1, 8, 8), steps=2, hidden=8, bins=4))
    assert resolve_runtime("auto", net, "cpu") == "onnx"
    assert resolve_runtime("torch", net, "cpu") == "torch"
    assert resolve_runtime("auto", flow, "cpu") == "torch"  # a flow's statistics need gradients
    with pytest.raises(ValueError, match="runtime onnx needs a score network"):
        resolve_runtime("onnx", flow, "cpu")
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_runtime("tensorrt", net, "cpu")


@pytest.mark.parametrize("make", [lambda: ScoreNorms((1.0, 0.1, 0.01)), lambda: Reconstruction((0.1, 0.3), steps=1),
                                  lambda: FeatureKNN(dims=8, max_bank=200)], ids=["msma", "reconstruction", "fknn"])
def test_forward_only_statistics_agree_on_both_runtimes(make, fashion):
    net = _net((1, 28, 28))
    exported = OnnxScoreNet(net)
    a = make().fit(net, fashion[:200]).compute(net, fashion[200:])
    b = make().fit(exported, fashion[:200]).compute(exported, fashion[200:])
    np.testing.assert_allclose(b, a, rtol=1e-4)


def test_flipd_difference_trace_matches_autograd_on_a_network(fashion):
    net, x = _net((1, 28, 28)), torch.from_numpy(fashion[:16])
    run = lambda difference: flipd(net, x, 0.05, probes=2, generator=torch.Generator().manual_seed(3),
                                   difference=difference)
    autograd, difference = run(None), run(0.01)
    assert (autograd - difference).abs().max() < 1e-3 * autograd.abs().max()
    assert not torch.allclose(run(0.01), flipd(net, x, 0.05, probes=2, generator=torch.Generator().manual_seed(4),
                                               difference=0.01))  # the probes matter, as in the autograd trace


def test_detector_uses_the_exported_network_for_forward_only_statistics_only(fashion):
    net = _net((1, 28, 28))
    det = build_detector("dual-threshold", net, "score")
    assert det.runtime == "onnx" and all(det.network_for(s) is net for s in det.statistics)  # gradients needed
    det = build_detector("combined", net, "score")
    assert isinstance(det.network_for(det.statistics[0]), OnnxScoreNet)
    assert build_detector("combined", net, "score", runtime="torch").network_for(det.statistics[0]) is net


def test_the_traced_graph_is_cached_per_model(tmp_path, monkeypatch):
    import dgmood.models.exported as exported_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    net, other = _net((1, 28, 28)), _net((1, 28, 28))
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert exported_module.graph_key(net) != exported_module.graph_key(other)
    # a loaded detector's network is channels-last (1 × 1 convolutions then have strides no view accepts)
    assert exported_module.graph_key(net.to(memory_format=torch.channels_last)) == exported_module.graph_key(net)
    x, sigma = torch.rand(3, 1, 28, 28), torch.full((3,), 0.2)
    first = OnnxScoreNet(net).scaled_score(x, sigma)
    files = list((tmp_path / "dgmood" / "onnx").glob("*.onnx"))
    assert [f.stem for f in files] == [exported_module.graph_key(net)]

    def no_tracing(model, batch=2):
        raise AssertionError("traced again although the graph is cached")

    with monkeypatch.context() as m:
        m.setattr(exported_module, "export_onnx", no_tracing)
        torch.testing.assert_close(OnnxScoreNet(net).scaled_score(x, sigma), first)
    files[0].write_bytes(b"not an onnx graph")  # damaged: traced again and replaced
    torch.testing.assert_close(OnnxScoreNet(net).scaled_score(x, sigma), first)
    assert files[0].read_bytes() != b"not an onnx graph"
    OnnxScoreNet(other)  # another model: its own file
    assert len(list((tmp_path / "dgmood" / "onnx").glob("*.onnx"))) == 2
