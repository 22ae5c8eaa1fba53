"""Run-directory helpers: spec arithmetic, default test sets, device resolution, config round trip."""

import pytest
import torch

from dgmood.models.network import NetConfig
from dgmood.app.runs import FeatureConfig, RunConfig, default_in_test, head_spec, resolve_device


@pytest.mark.parametrize("spec, n, expected", [
    ("fashion-mnist", 5000, "fashion-mnist[:5000]"),
    ("fashion-mnist", 0, "fashion-mnist"),
    ("mnist[:8000]", 5000, "mnist[0:5000]"),
    ("mnist[:8000]", 9000, "mnist[0:8000]"),
    ("mnist[2000:]", 100, "mnist[2000:2100]"),
    ("mnist[-500:]", 100, "mnist[-500:]"),
])
def test_head_spec(spec, n, expected):
    assert head_spec(spec, n) == expected


def test_default_in_test():
    assert default_in_test("fashion-mnist") == "fashion-mnist:test"
    assert default_in_test("mnist[:8000]") == ""


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")


def test_run_config_round_trip():
    cfg = RunConfig(data="mnist[:8000]", net=NetConfig(channels=(8, 16)), features=FeatureConfig(n_sigmas=5))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert len(cfg.features.sigmas()) == 5
