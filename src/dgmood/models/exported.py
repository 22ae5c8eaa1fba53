"""The score network as an ONNX Runtime session: the same forward pass, about 1.8× faster on 2 CPU cores.

PyTorch runs the small UNet op by op (group norm, SiLU, FiLM and concatenation between oneDNN convolutions);
ONNX Runtime fuses them and measured 0.36 against 0.67 ms per image per pass on the demo's network, with
outputs equal to 5e-6 (docs/results.md, issue 11). Only forward passes run here: statistics that need
gradients (the PF-ODE likelihood, FLIPD's autograd trace) keep the PyTorch module.

The graph is traced from the module's weights in memory at first use (about 2 s), never read from disk, so a
detector folder stays JSON + safetensors.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch

__all__ = ["OnnxScoreNet", "onnx_available", "resolve_runtime"]

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
    ONNX Runtime is installed, else ``torch``; ``onnx`` without ONNX Runtime or off the CPU is an error."""
    from dgmood.models.network import ScoreNet

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    usable = isinstance(model, ScoreNet) and torch.device(device).type == "cpu" and onnx_available()
    if runtime == "onnx" and not usable:
        raise ValueError("runtime onnx needs a score network on the CPU and onnxruntime installed "
                         "(`pip install onnxruntime`), or use runtime torch")
    return "onnx" if runtime != "torch" and usable else "torch"


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
            torch.onnx.export(_Traced(model.eval()), (x, sigma), buffer, dynamo=False, opset_version=18,
                              input_names=["x", "sigma"], output_names=["scaled_score", "mid"],
                              dynamic_axes={"x": {0: "n"}, "sigma": {0: "n"}, "scaled_score": {0: "n"},
                                            "mid": {0: "n"}})
    return buffer.getvalue()


class OnnxScoreNet:
    """A :class:`~dgmood.models.network.ScoreNet`'s forward pass run by ONNX Runtime, with its interface:
    :meth:`scaled_score`, the score by calling it, :meth:`scaled_score_and_mid`; torch tensors in and out.

    Args:
        model: The trained ScoreNet (its weights are traced now; later changes to it are not seen).
        threads: Intra-op threads (default: torch's).
        max_batch: Larger batches are run in pieces of this size (64–128 measured fastest on 2 cores).
    """

    def __init__(self, model, threads: int | None = None, max_batch: int = 128):
        import onnxruntime as ort

        self.config, self.max_batch = model.config, int(max_batch)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no busy-waiting after a run: the next work (a k-NN matmul, PNG coding) is PyTorch's on the same cores;
        # measured 22.2 against 24.5 s for `dgmood predict` on 3,000 images (DGMOOD_ORT_SPIN=1 turns it back on)
        options.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("DGMOOD_ORT_SPIN", "0"))
        self._session = ort.InferenceSession(export_onnx(model), options, providers=["CPUExecutionProvider"])

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
        parts = [self._session.run(None, {"x": xs[i:i + self.max_batch], "sigma": sigmas[i:i + self.max_batch]})
                 for i in range(0, len(xs), self.max_batch)]
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
