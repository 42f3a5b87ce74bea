"""Adapters: the method configs, one implementation module per method, target matching, merge /
unmerge / unload, PEFT-format I/O, named adapters mixed per row.

    model = apply(model, LoRA(r=16, alpha=32, targets="all-linear"))
    trainable, total = trainable_parameters(model)
    save_adapter(model, "out/adapter")              # PEFT format
    model = load_adapter(base_model, "out/adapter")
    plain = merge(model)                            # base class, deltas folded in

`METHODS` maps a method name to its config dataclass ("lora" -> LoRA, "full" -> Full); the configs
live in adapters/config.py (torch-free) and name their implementation module, which holds the
functions of the one method contract (adapters/registry.py). Names are exported lazily, so reading
the configs (the CLI's --help) does not import torch.
"""
from __future__ import annotations

from lorakit._lazy import lazy_exports

_CONFIG = "lorakit.adapters.config"
_DISPATCH = "lorakit.adapters.dispatch"
_MULTI = "lorakit.adapters.multi"
_EXPORTS = {
    "METHODS": _CONFIG, "register_method": "lorakit.adapters.registry",
    "Full": _CONFIG, "LoRA": _CONFIG, "DoRA": _CONFIG, "QLoRA": _CONFIG, "PromptTuning": _CONFIG,
    "Bottleneck": _CONFIG, "MoLE": _CONFIG, "Modality": _CONFIG, "ModalitySpec": _CONFIG,
    "media_rows": "lorakit.adapters.modality", "modality_slots": "lorakit.adapters.modality",
    "adapters_disabled": _DISPATCH, "apply": _DISPATCH, "apply_from_folder": _DISPATCH, "count": _DISPATCH, "load_adapter": _DISPATCH, "merge": _DISPATCH,
    "save_adapter": _DISPATCH, "unload": _DISPATCH, "unmerge": _DISPATCH,
    "find_targets": "lorakit.adapters.match",
    "parameter_report": "lorakit.adapters.report", "trainable_parameters": "lorakit.adapters.report",
    "adapter_names": _MULTI, "adapter_rows": _MULTI, "add_adapter": _MULTI, "delete_adapter": _MULTI,
    "set_adapter": _MULTI,
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
