"""The two generative models a run can train: the score network and the image flow."""

from __future__ import annotations

from dgmood.models.flow import FlowConfig, ImageFlow
from dgmood.models.network import NetConfig, ScoreNet

__all__ = ["MODEL_KINDS", "build_model", "config_from_dict", "draw_inputs", "model_kind", "per_image_loss",
           "training_loss"]

MODEL_KINDS = {"score": (NetConfig, ScoreNet), "flow": (FlowConfig, ImageFlow)}


def model_kind(config) -> str:
    """``"score"`` for a :class:`NetConfig`, ``"flow"`` for a :class:`FlowConfig`."""
    for kind, (config_type, _) in MODEL_KINDS.items():
        if isinstance(config, config_type):
            return kind
    raise TypeError(f"not a model config: {config!r}")


def config_from_dict(d: dict):
    """The config a ``to_dict`` wrote; dicts without ``kind`` are score networks (older runs)."""
    kind = d.get("kind", "score")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind][0].from_dict(d)


def build_model(config):
    """A fresh network for ``config`` (a NetConfig or FlowConfig)."""
    return MODEL_KINDS[model_kind(config)][1](config)


def draw_inputs(model, x, sigma_fn, generator) -> tuple:
    """The random inputs of the training loss of images ``x`` (N, C, H, W), drawn from ``generator``: (x, σ of
    shape (N,) from ``sigma_fn(N)``, ε of the shape of x) for a score network, (dequantised x,) for a flow."""
    import torch

    from dgmood.models.flow import dequantize

    if isinstance(model, ImageFlow):
        return (dequantize(x, generator),)
    sigma = sigma_fn(len(x)).to(x.device)
    return x, sigma, torch.randn(x.shape, generator=generator).to(x.device)


def per_image_loss(model, inputs: tuple):
    """Loss of each image, shape (N,), from :func:`draw_inputs`: DSM for a score network, bits/dim for a flow."""
    from dgmood.models.flow import bits_per_dim
    from dgmood.models.losses import dsm_loss

    if isinstance(model, ImageFlow):
        return bits_per_dim(model.log_prob(inputs[0]), model.dim)
    return dsm_loss(model, *inputs)


def training_loss(model, x, sigma_fn, generator):
    """Mean loss of a batch: DSM for a score network (σ from ``sigma_fn(n)``), bits/dim for a flow."""
    return per_image_loss(model, draw_inputs(model, x, sigma_fn, generator)).mean()
