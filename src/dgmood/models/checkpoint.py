"""Checkpoints as safetensors + JSON, written atomically and verified on load (no pickles)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dgmood.utils.errors import CheckpointError
from dgmood.utils.files import atomic_write, checksum_matches, file_sha256, remove_leftovers, with_checksum, write_json
from dgmood.models.registry import build_model, config_from_dict

__all__ = ["CheckpointError", "load_checkpoint", "load_model", "recover", "save_checkpoint"]

WEIGHTS, STATE, META = "weights.safetensors", "state.safetensors", "checkpoint.json"
META_SHA = "meta_sha256"  # checkpoint.json's checksum of its own content (absent in older checkpoints)
_STAGED = re.compile(r"^\.(weights|state)\.safetensors\.new$")


# what building a network or restoring state from a damaged/forged checkpoint.json or state file raises
_BAD_CONTENT = (LookupError, TypeError, ValueError, AttributeError, RuntimeError, ArithmeticError)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {
        f"optim.{idx}.{key}": value.detach().clone() if value.dim() else value.detach().reshape(1).clone()
        for idx, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value.reshape(()) if key == "step" else value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer, generator: torch.Generator, meta: dict
) -> None:
    """Write EMA weights, training state and ``meta`` (configs, step, log) into ``directory``.

    The new weight files are first staged beside the old ones (``.weights.safetensors.new``,
    ``.state.safetensors.new``); writing the JSON, which records their SHA-256, commits them, and only
    then are they renamed into place. A crash before the commit leaves the previous checkpoint
    untouched; a crash after it is completed by the next load (:func:`recover`). A swapped or damaged
    file is detected on load; checkpoint.json carries ``meta_sha256``, the SHA-256 of its own canonical
    JSON. Temporaries of earlier killed saves are deleted first (see :func:`dgmood.utils.files.is_leftover`).
    """
    directory = Path(directory)
    remove_leftovers(directory)
    optim_tensors, groups = _flatten_optimizer(optimizer.state_dict())
    state = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update(optim_tensors)
    state["rng.generator"] = generator.get_state()
    ema_state = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    staged = {WEIGHTS: _staged(directory, WEIGHTS), STATE: _staged(directory, STATE)}
    atomic_write(staged[WEIGHTS], lambda p: save_file(ema_state, str(p)))
    atomic_write(staged[STATE], lambda p: save_file(state, str(p)))
    meta = dict(meta, optimizer_param_groups=groups, net=model.config.to_dict(),
                sha256={name: file_sha256(path) for name, path in staged.items()})
    write_json(directory / META, with_checksum(meta, META_SHA))  # the commit point
    for name, path in staged.items():
        _move(path, directory / name)


def _staged(directory: Path, name: str) -> Path:
    """Where :func:`save_checkpoint` stages a new weight file until checkpoint.json commits it."""
    return Path(directory) / f".{name}.new"


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except FileNotFoundError:  # another process finished this save first
        pass


def _promote(directory: Path, meta: dict) -> None:
    """Rename staged files that ``meta`` commits (same SHA-256) into place; others are ignored."""
    sha = meta.get("sha256")
    for name in (WEIGHTS, STATE):
        staged = _staged(directory, name)
        try:
            if isinstance(sha, dict) and staged.is_file() and file_sha256(staged) == sha.get(name):
                _move(staged, Path(directory) / name)
        except FileNotFoundError:  # another process (a torchrun rank) promoted it meanwhile
            pass


def recover(directory: Path) -> None:
    """Finish a save that was cut short after its commit (no-op for a complete or absent checkpoint)."""
    try:
        _read_meta(directory)
    except CheckpointError:
        pass


def _read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: train a model first with `dgmood train`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); delete the checkpoint folder and retrain") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object); delete the checkpoint folder and retrain")
    _promote(directory, meta)
    remove_leftovers(directory, _STAGED)  # killed writes' temporaries, staged files no commit names
    return meta


def _verify_meta(directory: Path, meta: dict) -> None:
    """CheckpointError when checkpoint.json's ``meta_sha256`` does not match its content (older files have none).

    Called after the network and weight checks, so that a checkpoint.json naming another network or
    other weights reports that more precise problem.
    """
    if checksum_matches(meta, META_SHA) is False:
        raise CheckpointError(f"{Path(directory) / META} does not match its {META_SHA} (edited or damaged); restore "
                              f"it or retrain, or delete its {META_SHA} field to keep a deliberate edit")


def _load_verified(directory: Path, name: str, meta: dict) -> dict[str, torch.Tensor]:
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, retrain or restore it")
    sha = meta.get("sha256")
    if not isinstance(sha, dict) or file_sha256(path) != sha.get(name):
        raise CheckpointError(f"{path} does not match its checkpoint.json (corrupt or replaced); retrain or restore it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); retrain or restore it") from err


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The EMA model (ScoreNet or ImageFlow) of a checkpoint, in eval mode on ``device``, and the checkpoint's meta."""
    meta = _read_meta(directory)
    try:
        model = build_model(config_from_dict(meta["net"]))
    except _BAD_CONTENT as err:
        raise CheckpointError(f"{directory}/{META} has no valid network config ({err}); retrain or restore it") from err
    weights = _load_verified(directory, WEIGHTS, meta)
    try:
        model.load_state_dict(weights)
    except _BAD_CONTENT as err:
        raise CheckpointError(f"weights in {directory} do not fit the network in its config: {err}") from err
    _verify_meta(directory, meta)
    return model.to(device).eval(), meta


def load_checkpoint(
    directory: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer, generator: torch.Generator
) -> dict:
    """Restore model, EMA, optimizer and generator state in place from ``directory``; returns the meta."""
    meta = _read_meta(directory)
    if meta.get("net") != json.loads(json.dumps(model.config.to_dict())):
        raise CheckpointError(
            f"checkpoint in {directory} is for network {meta.get('net')}, not {model.config.to_dict()}; "
            "use a new run directory or the same --channels/--patch"
        )
    state = _load_verified(directory, STATE, meta)
    weights = _load_verified(directory, WEIGHTS, meta)
    _verify_meta(directory, meta)
    try:
        ema.load_state_dict(weights)
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        optim = {k: v for k, v in state.items() if k.startswith("optim.")}
        optimizer.load_state_dict(_unflatten_optimizer(optim, meta["optimizer_param_groups"]))
        generator.set_state(state["rng.generator"])
    except _BAD_CONTENT as err:
        raise CheckpointError(f"training state in {directory} does not fit the model/optimizer ({err}); "
                              "retrain or restore it") from err
    return meta
