"""Save, load, merge and unload for every method, dispatched by what the model or folder holds.

A method config may define `save(model, path, base_model_name_or_path)`, `merge(model, **kw)`
and `unload(model)`; without them the LoRA (PEFT-format) functions serve. A folder is read by
the method whose `folder_type` its adapter_config.json names (peft's `peft_type`, e.g.
"PROMPT_TUNING", or lorakit's own `lorakit_method`, e.g. "bottleneck"), looked up in the method
registry; everything else goes to the PEFT LoRA loader.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from lorakit.adapters import ops, peft_format
from lorakit.adapters.registry import method_for_folder, own_folder_types
from lorakit.adapters.state import get_state
from lorakit.errors import AdapterError


def _method_hook(model: nn.Module, name: str) -> Callable | None:
    state = get_state(model)
    return getattr(state.method, name, None) if state is not None else None


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter folder: PEFT format for LoRA and prompt tuning, lorakit's own otherwise."""
    save = _method_hook(model, "save")
    if save is not None:
        return save(model, path, base_model_name_or_path)
    return peft_format.save_adapter(model, path, base_model_name_or_path)


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter folder onto `base_model` in place, with the loader its config names."""
    folder = Path(path)
    raw = _peek_config(folder / peft_format.CONFIG_NAME)
    method = method_for_folder(raw.get("lorakit_method") or raw.get("peft_type"))
    if method is None and "lorakit_method" in raw:
        raise AdapterError(f"{folder / peft_format.CONFIG_NAME}: lorakit_method {raw['lorakit_method']!r} has no "
                           f"folder loader; lorakit's own folders hold one of: {', '.join(own_folder_types())}")
    if method is None:
        return peft_format.load_adapter(base_model, folder)  # LoRA, or its clear error about the folder
    return method.load_folder(base_model, folder, raw)


def _peek_config(path: Path) -> dict:
    """The config as a dict when it is readable JSON, else {} (the LoRA loader reports the problem)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def merge(model: nn.Module, **kwargs) -> nn.Module:
    """Fold the adapter into the base weights (see `ops.merge`); methods that cannot merge say why."""
    method_merge = _method_hook(model, "merge")
    return method_merge(model, **kwargs) if method_merge is not None else ops.merge(model, **kwargs)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge(model, keep_layers=True)` (see `ops.unmerge`)."""
    return ops.unmerge(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: the plain base model as before `apply`."""
    method_unload = _method_hook(model, "unload")
    return method_unload(model) if method_unload is not None else ops.unload(model)
