"""Merge, unmerge and unload: turning an adapted model back into a plain one."""
from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.layers import LoRALayer
from lorakit.adapters.param_lora import param_lora_modules
from lorakit.adapters.state import detach_state, get_state, lora_layers, replace_module, set_parameter
from lorakit.errors import AdapterError


def merge(model: nn.Module, *, safe: bool = True, keep_layers: bool = False) -> nn.Module:
    """Fold every LoRA delta into its base weight: W <- W + s * B A.

    By default the LoRA layers are then replaced by the plain layers they wrapped (nn.Linear,
    Conv1D, ...), so the result is the base model class with no lorakit modules; trained
    modules_to_save copies and biases stay, as they are part of the fine-tuned model.
    With `keep_layers=True` the layers stay (their branch switched off) so `unmerge` can undo it.
    `safe` first checks every merged weight and refuses NaN / Inf, naming the module.
    """
    layers = lora_layers(model)
    owners = param_lora_modules(model)
    _refuse_tied(model, layers)
    if safe:
        merged = [(f"module {path!r}", layer.merged_weight()) for path, layer in layers if not layer.merged]
        merged += [(f"parameter '{path}.{name}'", owner.adapted(name)) for path, owner in owners
                   if not owner.merged for name in owner.names]
        for path, weight in merged:
            if not torch.isfinite(weight).all():
                raise AdapterError(f"merging the LoRA adapter of {path} gives NaN or Inf weights; "
                                   "its lora_A / lora_B hold non-finite or overflowing values, so nothing was merged")
    for _, layer in layers + owners:
        layer.merge()
    if keep_layers:
        return model
    for path, layer in layers + owners:
        replace_module(model, path, layer.to_plain())
    _untie_config_if_diverged(model)
    detach_state(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the LoRA deltas folded in by `merge(model, keep_layers=True)`; returns the model."""
    layers = lora_layers(model) + param_lora_modules(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no LoRA layers to unmerge; only a model merged with "
                           "merge(model, keep_layers=True) can be unmerged")
    for _, layer in layers:
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: the plain base model as it was before `apply`.

    LoRA layers give back their base layers (unmerged first if merged), modules_to_save get their
    original parameters back, and biases trained by a bias mode get their base values back.
    Full fine-tuning has nothing to undo: its weights are the model's own.
    """
    for path, layer in lora_layers(model) + param_lora_modules(model):
        layer.unmerge()
        replace_module(model, path, layer.to_plain())
    state = get_state(model)
    if state is not None:
        for path, original in state.originals.items():
            current = model.get_parameter(path)
            set_parameter(model, path, like(original, current))
        with torch.no_grad():
            for path, values in state.bias_backup.items():
                model.get_parameter(path).copy_(values)
    detach_state(model)
    return model


def like(original: nn.Parameter, current: torch.Tensor) -> nn.Parameter:
    """The original parameter, moved to where the model now lives if it was moved since."""
    if original.device == current.device and original.dtype == current.dtype:
        return original
    return nn.Parameter(original.detach().to(current.device, current.dtype), requires_grad=False)


def _refuse_tied(model: nn.Module, layers: list[tuple[str, LoRALayer]]) -> None:
    """Merging into a weight shared with another module (tied embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path, layer in layers:
        others = [n for n in owners.get(id(layer.weight), []) if n != f"{path}.weight"]
        if others:
            raise AdapterError(f"module {path!r} shares its weight with {others[0]!r} (tied weights); merging its "
                               "LoRA delta would change both, so nothing was merged")


def _untie_config_if_diverged(model: nn.Module) -> None:
    """After merging, a tied lm_head trained as a modules_to_save copy no longer equals the input
    embeddings; record that in the config so saving and reloading keep the two apart."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out) or get_out() is None:
        return
    if get_in().weight is not get_out().weight:
        config.tie_word_embeddings = False
