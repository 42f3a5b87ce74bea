"""apply / save / load / add-by-name / merge / unload / count for every method, through the one contract.

Each call finds the method's implementation module (adapters/registry.py) from what it is given:
the config (`apply`, `count`), the adapter record on the model (`save_adapter`, `merge`, `unload`),
or the folder's adapter_config.json (`load_adapter`, `read_named`): peft's `peft_type` ("LORA",
"PROMPT_TUNING") or lorakit's own `lorakit_method` ("bottleneck", "mole"), each declared by its
method's config class as `folder_type`. A folder that names neither is read as PEFT LoRA, whose
loader says what is wrong with it.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from lorakit.adapters import ops, peft_format
from lorakit.adapters.config import Full, LoRA
from lorakit.adapters.registry import METHODS, implementation, method_for_folder, own_folder_types
from lorakit.adapters.state import get_state
from lorakit.errors import AdapterError, ConfigError


def _checked(method_cfg: Any) -> Any:
    if type(method_cfg) not in METHODS.values():
        raise ConfigError(f"{method_cfg!r} is not a method config; expected an instance of one of "
                          f"{', '.join(cls.__name__ for cls in METHODS.values())}")
    return method_cfg


def apply(model: nn.Module, method_cfg: Any) -> nn.Module:
    """Apply a method config (an instance of a class in METHODS) to `model` in place; returns it."""
    return implementation(_checked(method_cfg)).apply(method_cfg, model)


def count(model: nn.Module, method_cfg: Any) -> dict[str, int]:
    """Trainable numbers per module group once `method_cfg` is applied to `model` (changed in place).
    Only shapes are read, so a skeleton built on the meta device (no weights) is enough."""
    return implementation(_checked(method_cfg)).count(method_cfg, model)


def _method_of(model: nn.Module) -> tuple[Any, ModuleType]:
    """The model's method config and implementation; a model without a record is handled as LoRA."""
    state = get_state(model)
    method = state.method if state is not None else LoRA()
    return method, implementation(method)


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None, *,
                 tokenizer: Any = None, state_dict: dict | None = None) -> Path:
    """Write the model's adapter folder (PEFT format for LoRA, DoRA, QLoRA and prompt tuning, lorakit's own for
    bottleneck and MoLE; full fine-tuning: the whole model, with `tokenizer` and FSDP2's gathered `state_dict`)."""
    method, module = _method_of(model)
    return module.save(method, model, path, base_model_name_or_path, tokenizer=tokenizer, state_dict=state_dict)


def _folder_method(folder: Path) -> tuple[type, dict]:
    if not (folder / peft_format.CONFIG_NAME).exists() and (folder / "config.json").is_file():
        return Full, {}  # a whole model (what full fine-tuning saves), which Full's loader explains
    raw = _peek_config(folder / peft_format.CONFIG_NAME)
    method = method_for_folder(raw.get("lorakit_method") or raw.get("peft_type"))
    if method is None and "lorakit_method" in raw:
        raise AdapterError(f"{folder / peft_format.CONFIG_NAME}: lorakit_method {raw['lorakit_method']!r} has no "
                           f"folder loader; lorakit's own folders hold one of: {', '.join(own_folder_types())}")
    return method or LoRA, raw  # anything else: the LoRA loader reports what is wrong with the folder


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter folder onto `base_model` in place, with the loader its config names."""
    method, raw = _folder_method(Path(path))
    return implementation(method).load_folder(base_model, Path(path), raw)


def read_named(model: nn.Module, name: str, path: str | Path) -> Any:
    """The folder at `path` as the named adapter `name` (adapters/named.py), by its method's `named`."""
    method, raw = _folder_method(Path(path))
    return implementation(method).named(model, name, Path(path), raw)


def _peek_config(path: Path) -> dict:
    """The config as a dict when it is readable JSON, else {} (the LoRA loader reports the problem)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def merge(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Fold the adapter into the base weights (see `ops.merge`); methods that cannot merge say why."""
    method, module = _method_of(model)
    return module.merge(method, model, **kwargs)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge(model, keep_layers=True)` (see `ops.unmerge`)."""
    return ops.unmerge(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: the plain base model as before `apply`."""
    method, module = _method_of(model)
    return module.unload(method, model)
