"""What an applied adapter records on the model, so it can be saved, merged and undone.

The record is one attribute, `model.lorakit_adapter` (an `AdapterState`). Parameter paths in it
are the base model's own paths: adapter layers keep the names of the layers they wrap, so the
paths stay valid before and after unwrapping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.adapters.layers import LoRALayer
from lorakit.adapters.param_lora import ParamLoRA
from lorakit.errors import AdapterError

STATE_ATTR = "lorakit_adapter"


@dataclass
class AdapterState:
    """The adapter on a model: its config, what it touched, and what to restore on unload."""

    method: Any
    """The method config that was applied (LoRA, Full, ...)."""
    targets: list[str] = field(default_factory=list)
    """Paths of the modules wrapped by adapter layers, in model order."""
    saved_modules: list[str] = field(default_factory=list)
    """Paths of the modules_to_save: trained in full, as copies of the base modules."""
    originals: dict[str, nn.Parameter] = field(default_factory=dict)
    """Parameter path -> the base parameter that a trainable copy replaced (modules_to_save)."""
    bias_backup: dict[str, torch.Tensor] = field(default_factory=dict)
    """Parameter path -> base values of a bias that trains in place (bias modes 'all', 'lora_only')."""
    started_from: str | None = None
    """The adapter folder whose trained weights the adapter started from (`dispatch.apply_from_folder`), else
    None: a freshly initialised adapter, which leaves the model equal to its base."""


def get_state(model: nn.Module) -> AdapterState | None:
    """The adapter record on `model`, or None for a plain model."""
    return getattr(model, STATE_ATTR, None)


def require_state(model: nn.Module) -> AdapterState:
    """The adapter record, or an AdapterError when the model carries no lorakit adapter."""
    state = get_state(model)
    if state is None:
        raise AdapterError(f"{type(model).__name__} carries no lorakit adapter; call lorakit.apply or "
                           "lorakit.load_adapter first")
    return state


def attach_state(model: nn.Module, state: AdapterState) -> None:
    """Record `state` on the model."""
    setattr(model, STATE_ATTR, state)


def detach_state(model: nn.Module) -> None:
    """Forget the adapter record (after merge or unload)."""
    if STATE_ATTR in model.__dict__:
        delattr(model, STATE_ATTR)


def ensure_plain(model: nn.Module) -> None:
    """Refuse a model that already carries an adapter: one adapter per model."""
    state = get_state(model)
    has_layers = any(isinstance(m, (LoRALayer, ParamLoRA)) for m in model.modules())
    if state is not None or has_layers:
        name = getattr(getattr(state, "method", None), "name", "lora")
        raise AdapterError(f"{type(model).__name__} already carries a '{name}' adapter; merge or unload it "
                           "before applying another")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """(path, layer) for every LoRA layer in the model, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at dotted `path` inside `model`."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def set_parameter(model: nn.Module, path: str, param: nn.Parameter) -> None:
    """Register `param` at dotted parameter `path` (replacing what is there)."""
    owner_path, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    setattr(owner, leaf, param)


def is_inside(path: str, prefixes) -> bool:
    """True when dotted `path` is one of `prefixes` or lies inside one of them."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)
