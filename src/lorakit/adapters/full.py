"""Full fine-tuning: every parameter of the model trains; the result is a whole model, not an adapter.

The method contract (adapters/registry.py) for the baseline every adapter method is compared with:
`save` writes the model (safetensors, loadable by `from_pretrained`) with its tokenizer; there is
nothing to merge (the weights already hold the update) or to unload, and no folder to add by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.adapters.config import Full
from lorakit.adapters.report import trainable_by_module
from lorakit.adapters.state import AdapterState, attach_state, detach_state, ensure_plain
from lorakit.errors import AdapterError
from lorakit.permissions import share_tree

__all__ = ["Full", "apply", "count", "load_folder", "merge", "named", "save", "unload"]


def apply(cfg: Full, model: nn.Module) -> nn.Module:
    """Make every parameter trainable; returns the model."""
    ensure_plain(model)
    model.requires_grad_(True)
    attach_state(model, AdapterState(method=cfg))
    return model


def save(cfg: Full, model: nn.Module, folder: str | Path, base: str | None = None, *,
         tokenizer: Any = None, state_dict: dict | None = None) -> Path:
    """The whole fine-tuned model (safetensors) with its tokenizer, loadable by from_pretrained;
    `state_dict`: its weights gathered from FSDP2 shards, when the trainer sharded it."""
    folder = Path(folder)
    model.save_pretrained(folder, state_dict=state_dict)  # transformers 5 writes safetensors only
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    share_tree(folder)  # the safetensors files are written 0600 whatever the umask: a shared model follows it
    return folder


def load_folder(base_model: nn.Module, folder: Path, raw: dict) -> nn.Module:
    """Refused: a full fine-tuning run saves a whole model, which is loaded as the base itself."""
    raise AdapterError(f"{folder} holds a whole fine-tuned model, not an adapter; load it as the model "
                       "(--model FOLDER or from_pretrained)")


def named(model: nn.Module, name: str, folder: Path, raw: dict) -> Any:
    """Refused: a whole model cannot sit beside others on one base."""
    raise AdapterError(f"{folder} holds a whole fine-tuned model, not an adapter; named adapters are adapter "
                       "folders (LoRA, DoRA, prompt tuning, bottleneck, MoLE)")


def merge(cfg: Full, model: nn.Module, **options: Any) -> nn.Module:
    """Nothing to fold in: the weights already hold the update; the model comes back as a plain one."""
    detach_state(model)
    return model


def unload(cfg: Full, model: nn.Module) -> nn.Module:
    """Nothing to undo: full fine-tuning changed the model's own weights; forgets the method record."""
    detach_state(model)
    return model


def count(cfg: Full, model: nn.Module) -> dict[str, int]:
    """Every parameter, per module (a tied matrix counted once)."""
    return trainable_by_module(apply(cfg, model))
