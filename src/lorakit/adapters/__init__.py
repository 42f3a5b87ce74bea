"""Adapters: one file per method, target matching, merge / unmerge / unload, PEFT-format I/O.

    model = apply(model, LoRA(r=16, alpha=32, targets="all-linear"))
    trainable, total = trainable_parameters(model)
    save_adapter(model, "out/adapter")              # PEFT format
    model = load_adapter(base_model, "out/adapter")
    plain = merge(model)                            # base class, deltas folded in

`METHODS` maps a method name to its config dataclass ("lora" -> LoRA, "full" -> Full). A new
method is one file with a config class decorated by `register_method`, imported below.
"""
from __future__ import annotations

from torch import nn

from lorakit.adapters.full import Full  # registered first: --help and errors list full and lora first
from lorakit.adapters.lora import LoRA
from lorakit.adapters.bottleneck import Bottleneck  # noqa: I001
from lorakit.adapters.dispatch import load_adapter, merge, save_adapter, unload, unmerge
from lorakit.adapters.dora import DoRA
from lorakit.adapters.match import find_targets
from lorakit.adapters.mole import MoLE
from lorakit.adapters.multi import adapter_names, adapter_rows, add_adapter, delete_adapter, set_adapter
from lorakit.adapters.prompt_tuning import PromptTuning
from lorakit.adapters.qlora import QLoRA
from lorakit.adapters.registry import METHODS, register_method
from lorakit.adapters.report import parameter_report, trainable_parameters
from lorakit.errors import ConfigError

__all__ = ["METHODS", "Bottleneck", "DoRA", "Full", "LoRA", "MoLE", "PromptTuning", "QLoRA", "apply", "find_targets",
           "load_adapter", "merge", "parameter_report", "register_method", "save_adapter", "trainable_parameters",
           "unload", "unmerge"]
__all__ += ["adapter_names", "adapter_rows", "add_adapter", "delete_adapter", "set_adapter"]  # named, per row


def apply(model: nn.Module, method_cfg) -> nn.Module:
    """Apply a method config (an instance of a class in METHODS) to `model` in place; returns it."""
    if type(method_cfg) not in METHODS.values():
        raise ConfigError(f"{method_cfg!r} is not a method config; expected an instance of one of "
                          f"{', '.join(cls.__name__ for cls in METHODS.values())}")
    return method_cfg.apply(model)
