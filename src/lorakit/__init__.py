"""lorakit: post-training for causal language models.

The public API is re-exported here lazily, so `import lorakit` stays cheap (the CLI starts
fast) and each name still lives in exactly one room:

    import lorakit
    model = lorakit.apply(model, lorakit.LoRA(r=16, alpha=32, targets="all-linear"))
    # or lorakit.DoRA / QLoRA / PromptTuning / Bottleneck / MoLE / Full
    trainable, total = lorakit.trainable_parameters(model)
    lorakit.save_adapter(model, "out/adapter")          # PEFT format
    model = lorakit.load_adapter(base_model, "out/adapter")
    plain = lorakit.merge(model)
    run = lorakit.finetune("my.yaml", **{"train.lr": 3e-4})  # what `lorakit train` does; returns the run
"""
from __future__ import annotations

from lorakit._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LoRA": "lorakit.adapters.config",
    "Full": "lorakit.adapters.config",
    "DoRA": "lorakit.adapters.config",
    "QLoRA": "lorakit.adapters.config",
    "PromptTuning": "lorakit.adapters.config",
    "Bottleneck": "lorakit.adapters.config",
    "MoLE": "lorakit.adapters.config",
    "Modality": "lorakit.adapters.config",
    "ModalitySpec": "lorakit.adapters.config",
    "apply": "lorakit.adapters",
    "count": "lorakit.adapters",
    "trainable_parameters": "lorakit.adapters",
    "parameter_report": "lorakit.adapters",
    "save_adapter": "lorakit.adapters",
    "load_adapter": "lorakit.adapters",
    "merge": "lorakit.adapters",
    "unmerge": "lorakit.adapters",
    "unload": "lorakit.adapters",
    "find_targets": "lorakit.adapters.match",
    "add_adapter": "lorakit.adapters.multi",
    "set_adapter": "lorakit.adapters.multi",
    "delete_adapter": "lorakit.adapters.multi",
    "adapter_names": "lorakit.adapters.multi",
    "load_model": "lorakit.models",
    "load_tokenizer": "lorakit.models",
    "generate": "lorakit.infer.generate",
    "finetune": "lorakit.run",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
