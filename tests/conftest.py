"""Shared fixtures: thread limits and the data directory."""

import os
import sys
from pathlib import Path

# One BLAS thread too, set before numpy/scipy load their OpenBLAS (and inherited by the CLI subprocesses some tests
# start): on 2 shared cores OpenBLAS's spinning second thread made the GMM fits of tiny feature sets 14x slower
# (5 mixtures of 300 x 10 rows: 0.16 s with one thread, 2.3 s with two beside another busy process).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `make test` exports it: idle OpenMP threads sleep

import numpy  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402,F401  (loads scipy's own OpenBLAS, so the limit below reaches it too)
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

# benchmarks/ holds the scripts and the paper-reproduction package (not part of the library)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# One thread: the tests run tiny networks, where thread overhead dominates on 2 shared cores.
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
threadpool_limits(1, user_api="blas")  # in case a plugin loaded numpy before the variable above was set


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Back to one torch thread after each test: a CLI command run in-process without --threads sets torch to
    os.cpu_count() threads, which then slowed every later test of the session (a tiny score net's likelihood ODE
    took 90 s instead of 1 s on 2 busy cores)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Path:
    """The user cache (traced ONNX graphs) of this test session: a temporary folder, never ~/.cache."""
    folder = tmp_path_factory.mktemp("user-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def random_head_net(shape, channels=(8, 16, 16), seed=0, dtype=torch.float32):
    """A small ScoreNet whose zero-initialised head is randomised, so outputs are not trivially 0."""
    from dgmood.models.network import NetConfig, ScoreNet

    torch.manual_seed(seed)
    net = ScoreNet(NetConfig(image_shape=shape, channels=channels, emb_dim=8)).to(dtype).eval()
    torch.nn.init.normal_(net.head[-1].weight, std=0.1)
    torch.nn.init.normal_(net.head[-1].bias, std=0.1)
    return net


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory holding the IDX files; tests needing it skip when it is absent."""
    root = Path(os.environ.get("DGMOOD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "fashion-mnist").is_dir():
        pytest.skip(f"no dataset directory at {root}; set DGMOOD_DATA")
    return root


def write_pooled_sets(root: Path, data_dir: Path, sizes: dict[str, tuple[str, int]]) -> dict[str, Path]:
    """Real images average-pooled to 8×8 (D = 64, so Jacobians, LPCA and mixtures stay cheap), saved as
    ``root/NAME.npy`` in (N, H, W, C) layout; ``sizes`` maps NAME → (dataset spec, first n images)."""
    import numpy as np

    from dgmood.data.datasets import load_images

    paths = {}
    for name, (spec, n) in sizes.items():
        x = torch.from_numpy(load_images(spec, data_dir)[:n])
        paths[name] = root / f"{name}.npy"
        np.save(paths[name], torch.nn.functional.adaptive_avg_pool2d(x, 8).numpy().transpose(0, 2, 3, 1))
    return paths


def load_script(name: str):
    """A script of ``benchmarks/`` imported as a module (they are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_run(path: Path, data_dir: Path, sets: dict, net, steps: int, perturb: float = 0.0, features=None):
    """A run on the pooled sets of :func:`write_pooled_sets` (``train``, ``in``), trained ``steps`` steps of 32."""
    from dgmood.app.runs import FeatureConfig, Run, RunConfig
    from dgmood.models.train import TrainConfig

    run = Run(path, data_dir=data_dir, progress=False)
    run.create(RunConfig(data=str(sets["train"]), in_test=str(sets["in"]), net=net,
                         features=features or FeatureConfig(),
                         train=TrainConfig(steps=steps, batch_size=32, warmup=2, checkpoint_every=steps,
                                           perturb=perturb)))
    run.train()
    return run
