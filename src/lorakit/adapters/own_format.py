"""lorakit's own adapter folder format, for methods peft does not have (bottleneck, mole).

A folder holds two files:

    adapter_config.json         {"lorakit_method": "<name>", "lorakit_format": 1,
                                 "base_model_name_or_path": ..., "config": {<the method config's fields>}}
    adapter_model.safetensors   every trainable tensor of the adapter under its live-model path,
                                e.g. "model.layers.0.mlp.lorakit_bottleneck.down.weight"

Loading applies the method config to the base model (same module paths, same shapes), then
copies the tensors in after checking that the file holds exactly the adapter's parameters.
Weights are read with safetensors only.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapters.jsonfile import read_json_object
from lorakit.adapters.registry import implementation, method_for_folder
from lorakit.errors import AdapterError, ConfigError
from lorakit.permissions import share

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Live-model path -> detached CPU copy of every trainable parameter."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def write_folder(folder: str | Path, method_cfg: Any, tensors: dict[str, torch.Tensor],
                 base_model_name_or_path: str | None) -> Path:
    """Write `method_cfg` (a dataclass with a `name`) and `tensors` as a lorakit adapter folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"lorakit_method": method_cfg.name, "lorakit_format": FORMAT_VERSION,
              "base_model_name_or_path": base_model_name_or_path, "config": dataclasses.asdict(method_cfg)}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    share(folder / WEIGHTS_NAME)  # save_file writes 0600 whatever the umask: a shared adapter follows it
    return folder


def save(cfg: Any, model: nn.Module, folder: str | Path, base: str | None = None, *,
         tokenizer: Any = None, state_dict: dict | None = None) -> Path:
    """The contract's `save` for the methods of this format: the config and every trainable tensor."""
    return write_folder(folder, cfg, trainable_tensors(model), base)


def load_folder(base_model: nn.Module, folder: Path, raw: dict) -> nn.Module:
    """The contract's `load_folder` for this format: the folder's method config applied to `base_model`, then
    its tensors copied in (the method unloaded again if they do not fit)."""
    cfg = method_config(raw, method_for_folder(raw.get("lorakit_method")), folder / CONFIG_NAME)
    method = implementation(cfg)
    method.apply(cfg, base_model)
    try:
        copy_into(base_model, folder)
    except AdapterError:
        method.unload(cfg, base_model)  # leave the base model as it was
        raise
    return base_model


def read_config(folder: Path) -> dict:
    """adapter_config.json of a lorakit-format folder as a dict (no method check)."""
    return read_json_object(folder / CONFIG_NAME, f"an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")


def method_config(raw: dict, cls: type, source: Path) -> Any:
    """The method config that adapter_config.json's "config" object describes."""
    if raw.get("lorakit_format") != FORMAT_VERSION:
        raise AdapterError(f"{source}: lorakit_format is {raw.get('lorakit_format')!r}; this lorakit reads "
                           f"format {FORMAT_VERSION}")
    fields = raw.get("config")
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or set(fields) - known:
        extra = sorted(set(fields) - known) if isinstance(fields, dict) else fields
        raise AdapterError(f"{source}: 'config' must be an object of {cls.__name__} fields; unexpected: {extra!r}")
    try:
        return cls(**fields)
    except (ConfigError, TypeError) as error:
        raise AdapterError(f"{source}: {error}") from error


def copy_into(model: nn.Module, folder: Path) -> None:
    """Copy the folder's tensors into the model's trainable parameters, after checking they match."""
    copy_tensors({name: p for name, p in model.named_parameters() if p.requires_grad}, folder)


def copy_tensors(params: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the folder's tensors into `params` (path -> tensor), after checking names and shapes match."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found; the adapter folder has no weights file")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors reports corrupt files as its own error type
        raise AdapterError(f"cannot read {path}: {error}; the file is corrupt or truncated") from error
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(f"{path} does not fit this model's adapter: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise AdapterError(f"{path}: {name!r} is {tuple(tensor.shape)} in the file but "
                                   f"{tuple(params[name].shape)} in the model")
            params[name].copy_(tensor)
