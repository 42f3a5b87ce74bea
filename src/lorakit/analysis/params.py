"""Trainable parameters of any registered method on any model, counted by the method itself.

`method_count(model, method)` builds the model's skeleton on the meta device (analysis/targets.py:
a preset, a local folder, a hub config or 'embedded'; shapes only, no weights) and applies the
method config to it through the one method contract, `lorakit.adapters.count`: the numbers are
those a real run trains, per module group, with the method's own target matching and checks.
Target names 'attention' and 'mlp' are the target sets of `targets.resolve_target_set`; any other
`targets` value goes to the method as written.

Each count also keeps what the memory estimate (analysis/memory.py) needs from the same skeleton:
the base model's size, the part of it in linear layers (what QLoRA stores in 4 bits) and, for the
LoRA family, r summed over the adapted layers (the activations the low-rank branch saves).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit import adapters
from lorakit.adapters.state import lora_layers
from lorakit.analysis.targets import TARGET_SETS, linear_paths, model_config, resolve_target_set, skeleton


@dataclass(frozen=True)
class MethodCount:
    """One method config applied to a model's skeleton: what trains, and the base it trains on."""

    method: Any  # the method config as given (targets 'attention' / 'mlp' are resolved only to apply it)
    groups: dict[str, int]  # trainable numbers per module group, as `lorakit.adapters.count` gives them
    total: int  # parameters of the base model, a tied matrix counted once
    linear_params: int  # of which in the layers 'all-linear' selects (QLoRA stores these in 4 bits)
    rank_sum: int  # r summed over the model's LoRA layers (0 for methods without them)

    @property
    def trainable(self) -> int:
        """Trainable numbers in all."""
        return sum(self.groups.values())


def with_target_set(method: Any, model: nn.Module) -> Any:
    """`method` with targets 'attention' or 'mlp' replaced by that set's layers of `model`; else unchanged."""
    targets = getattr(method, "targets", None)
    if not isinstance(targets, str) or targets not in TARGET_SETS:
        return method
    return dataclasses.replace(method, targets=resolve_target_set(targets, model))


def lora_rank_sum(model: nn.Module) -> int:
    """r summed over the LoRA (DoRA, QLoRA) layers of `model`."""
    return sum(layer.r for _, layer in lora_layers(model))


def method_count(model: Any, method: Any, trust_remote_code: bool = False) -> MethodCount:
    """Apply `method` (an instance of a class in lorakit.adapters.METHODS) to a fresh skeleton of `model`
    (anything `targets.model_config` reads) and count what trains."""
    base = skeleton(model_config(model, trust_remote_code), trust_remote_code)
    total = adapters.trainable_parameters(base)[1]
    modules = dict(base.named_modules())
    linear = sum(p.numel() for path in linear_paths(base) for p in modules[path].parameters())
    groups = adapters.count(base, with_target_set(method, base))
    return MethodCount(method, groups, total, linear, lora_rank_sum(base))
