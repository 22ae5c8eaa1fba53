"""The score network as an ONNX Runtime session: the same forward pass, about 1.8× faster on 2 CPU cores.

PyTorch runs the small UNet op by op (group norm, SiLU, FiLM and concatenation between oneDNN convolutions);
ONNX Runtime fuses them and measured 0.36 against 0.67 ms per image per pass on the demo's network, with
outputs equal to 5e-6 (docs/results.md, issue 11). Only forward passes run here: statistics that need
gradients (the PF-ODE likelihood, FLIPD's autograd trace) keep the PyTorch module.

The graph is traced from the module's weights at first use (about 1 s) and kept in the user's cache
(``~/.cache/dgmood/onnx``, named by the SHA-256 of the weights, the network config and the torch version), so a
later process on the same model skips the tracing; a detector folder stays JSON + safetensors, and a damaged or
unwritable cache only means tracing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dgmood.utils import kernels

__all__ = ["OnnxScoreNet", "graph_key", "onnx_available", "resolve_runtime"]

RUNTIMES = ("auto", "torch", "onnx")


def onnx_available() -> bool:
    """Whether ONNX Runtime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str, model, device) -> str:
    """``torch`` or ``onnx``: ``auto`` is ``onnx`` for a :class:`~dgmood.models.network.ScoreNet` on the CPU when
    ONNX Runtime is installed (unless ``DGMOOD_KERNELS=runtime=torch``, :func:`dgmood.utils.kernels.runtime`),
    else ``torch``; ``onnx`` without ONNX Runtime or off the CPU is an error."""
    from dgmood.models.network import ScoreNet

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    usable = isinstance(model, ScoreNet) and torch.device(device).type == "cpu" and onnx_available()
    if runtime == "onnx" and not usable:
        raise ValueError("runtime onnx needs a score network on the CPU and onnxruntime installed "
                         "(`pip install onnxruntime`), or use runtime torch")
    wanted = runtime == "onnx" or runtime == "auto" and kernels.runtime().value == "onnx"
    return "onnx" if wanted and usable else "torch"


class _Traced(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        return self.net.scaled_score_and_mid(x, sigma)


def export_onnx(model, batch: int = 2) -> bytes:
    """The ONNX graph of ``model.scaled_score_and_mid`` (inputs ``x`` (N, C, H, W), ``sigma`` (N,); outputs
    ``scaled_score``, ``mid``), with a dynamic batch dimension, as bytes."""
    x = torch.rand(batch, *model.config.image_shape)
    sigma = torch.full((batch,), 0.1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation note and tracing notes on shape checks
        with torch.no_grad():
            torch.onnx.export(_Traced(model.eval()), (x, sigma), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["x", "sigma"], output_names=["scaled_score", "mid"],
                              dynamic_axes={"x": {0: "n"}, "sigma": {0: "n"}, "scaled_score": {0: "n"},
                                            "mid": {0: "n"}})
    return buffer.getvalue()


OPSET = 18


def graph_key(model) -> str:
    """What the traced graph depends on, hashed: the weights (names, dtypes, shapes, bytes), the network config,
    the torch version and the opset; 32 hex digits."""
    digest = hashlib.sha256(json.dumps({"config": model.config.to_dict(), "torch": torch.__version__,
                                        "opset": OPSET}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # C order, any memory format
    return digest.hexdigest()[:32]


def _cached_graph(model) -> tuple[bytes, Path | None]:
    """(graph bytes, the cache file they came from or None when traced now); tracing writes the cache file
    (atomically; nothing when the cache folder is not writable)."""
    from dgmood.utils.files import atomic_write, user_cache_dir

    path = user_cache_dir("onnx") / f"{graph_key(model)}.onnx"
    try:
        return path.read_bytes(), path
    except OSError:
        pass
    data = export_onnx(model)
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    except OSError:
        pass
    return data, None


def pieces(n: int, max_batch: int, workers: int) -> list[slice]:
    """Contiguous slices of ``n`` images, at most ``max_batch`` each and at least ``workers`` of them when there are
    that many images, sizes within one of each other."""
    count = min(n, max(workers, -(-n // max_batch))) if n else 0
    bounds = np.linspace(0, n, count + 1).round().astype(int) if count else [0]
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class OnnxScoreNet:
    """A :class:`~dgmood.models.network.ScoreNet`'s forward pass run by ONNX Runtime, with its interface:
    :meth:`scaled_score`, the score by calling it, :meth:`scaled_score_and_mid`; torch tensors in and out.

    A batch runs as pieces of at most ``max_batch`` images, ``threads`` pieces at a time, each on one core: on the
    small UNet the per-operator synchronisation of intra-op threads cost more than it parallelised (2 cores: 0.33
    against 0.44 ms per image and pass for one 2-thread run at a time, docs/results.md).

    Args:
        model: The trained ScoreNet (its weights are traced now; later changes to it are not seen).
        threads: Pieces run at once, one core each (default: torch's thread count).
        max_batch: Images per piece (32–64 measured fastest on 2 cores).
    """

    def __init__(self, model, threads: int | None = None, max_batch: int = 64):
        import onnxruntime as ort

        self.config, self.max_batch = model.config, int(max_batch)
        self.threads = max(1, int(threads or torch.get_num_threads()))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        graph, cached = _cached_graph(model)
        try:
            self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001  (a damaged cache file: trace again and replace it)
            if cached is None:
                raise
            cached.unlink(missing_ok=True)
            self._session = ort.InferenceSession(_cached_graph(model)[0], options, providers=["CPUExecutionProvider"])
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dgmood-onnx") if self.threads > 1 else None

    def __repr__(self) -> str:
        return f"OnnxScoreNet(channels={self.config.channels}, image_shape={self.config.image_shape})"

    def scaled_score_and_mid(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ·s(x, σ) (N, C, H, W), middle-block activations (N, C_mid, h, w)); x in pixel units, σ (N,)."""
        if tuple(x.shape[1:]) != tuple(self.config.image_shape):
            raise ValueError(f"images of shape {tuple(x.shape[1:])} given to a model for {tuple(self.config.image_shape)}")
        if x.requires_grad:
            raise ValueError("OnnxScoreNet runs forward passes only; use the torch module where gradients are needed")
        xs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        sigmas = np.ascontiguousarray(sigma.detach().cpu().numpy(), dtype=np.float32).reshape(-1)
        run = lambda part: self._session.run(None, {"x": xs[part], "sigma": sigmas[part]})  # noqa: E731
        slices = pieces(len(xs), self.max_batch, self.threads)
        parts = list(self._pool.map(run, slices)) if self._pool and len(slices) > 1 else [run(p) for p in slices]
        out, mid = (torch.from_numpy(np.concatenate(outputs)) for outputs in zip(*parts))
        return out, mid

    def scaled_score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """σ·s(x, σ), shapes as :meth:`scaled_score_and_mid`."""
        return self.scaled_score_and_mid(x, sigma)[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The score s(x, σ), units 1/pixel."""
        return self.scaled_score(x, sigma) / sigma.reshape(-1, 1, 1, 1).to(torch.float32)

    def eval(self) -> "OnnxScoreNet":
        return self
