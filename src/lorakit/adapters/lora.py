"""LoRA (Hu et al. 2021, arXiv:2106.09685): the method's implementation, W' = W + s * B A on target layers.

`lorakit.apply(model, LoRA(...))` wraps each target layer in a `LoRALayer` (a `DoRALayer` for
DoRA, whose math lives in dora.py), freezes everything else, makes the chosen biases trainable,
and swaps each module in `modules_to_save` for a trainable copy, with peft's semantics
throughout, so the adapter saves in PEFT format (peft_format.py). The functions below are the
method contract (adapters/registry.py) for LoRA and DoRA; QLoRA reuses them after quantising.

    math      lora_math.py: s = alpha / r (alpha / sqrt(r) with rslora), branch s * B (A x),
              r * (d_in + d_out) trainable numbers per target layer (lora_param_count)
    layer     layers.py: LoRALayer (Linear, Conv1D); param_lora.py: 3-D expert parameters
    save/load peft_format.py: PEFT's folder (adapter_config.json + adapter_model.safetensors)
    merge     ops.py: W <- W + s B A, layer by layer (DoRA: m * (W + s B A) / ||W + s B A||)
    named     NamedLoRA: the bank of multi.py mixes such pairs per row (DoRA with frozen factors)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters import ops, peft_format
from lorakit.adapters.config import DoRA, LoRA
from lorakit.adapters.dora import DoRALayer, frozen_factors
from lorakit.adapters.layers import LoRALayer, adapter_dtype, layer_kind
from lorakit.adapters.lora_math import scaling
from lorakit.adapters.match import find_targets, resolve_modules_to_save
from lorakit.adapters.named import NamedLoRA
from lorakit.adapters.param_lora import ParamLoRA, find_param_targets
from lorakit.adapters.report import trainable_by_module
from lorakit.adapters.state import AdapterState, attach_state, ensure_plain, is_inside, replace_module, set_parameter
from lorakit.errors import AdapterError

__all__ = ["LoRA", "apply", "count", "inject", "load_folder", "merge", "named", "save", "unload"]


def apply(cfg: LoRA, model: nn.Module) -> nn.Module:
    """Inject LoRA (or DoRA) into `model` in place (see the module docstring); returns the model."""
    ensure_plain(model)
    saved = resolve_modules_to_save(model, cfg.modules_to_save)
    module_targets = cfg.targets if cfg.targets or not cfg.target_parameters else None
    paths = [p for p in find_targets(model, module_targets) if not is_inside(p, saved)] if module_targets else []
    if module_targets and not paths:
        raise AdapterError(f"LoRA targets {cfg.targets!r} select only modules listed in modules_to_save; "
                           "nothing is left to adapt")
    return inject(model, cfg, paths, saved)


def save(cfg: LoRA, model: nn.Module, folder: str | Path, base: str | None = None, *,
         tokenizer: Any = None, state_dict: dict | None = None) -> Path:
    """Write the adapter as a PEFT LoRA folder (`use_dora: true` for DoRA); the tokenizer is not needed."""
    return peft_format.save_adapter(model, folder, base)


def load_folder(base_model: nn.Module, folder: Path, raw: dict) -> nn.Module:
    """Load a PEFT LoRA / DoRA folder (saved by lorakit or peft) onto `base_model`, checked before it is touched."""
    found = peft_format.read_folder(base_model, Path(folder))
    inject(base_model, found.cfg, found.paths, found.saved)
    peft_format.copy_in(base_model, found)
    return base_model


def named(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedLoRA:
    """A PEFT LoRA / DoRA folder as a named adapter: its A, B per module, and DoRA's factors frozen at load."""
    found = peft_format.read_folder(model, Path(folder), named=True)
    if found.weights.params:
        raise AdapterError(f"{folder}: adapter {name!r} also trains {sorted(found.weights.params)[0]!r} (a bias or a "
                           "modules_to_save copy); per-row adapters hold LoRA weights only, so load it with "
                           "load_adapter instead")
    base_weight = next(model.parameters())
    dtype = adapter_dtype(base_weight.dtype)
    pairs = {path: (A.to(base_weight.device, dtype), B.to(base_weight.device, dtype))
             for path, (A, B) in found.weights.lora.items()}
    scale = scaling(found.cfg.alpha, found.cfg.r, found.cfg.rslora)
    with torch.no_grad():
        dora = {path: frozen_factors(model.get_submodule(path), *pairs[path], scale, magnitude.to(base_weight.device))
                for path, magnitude in found.weights.magnitude.items()}
    return NamedLoRA(name, pairs, scale, str(folder), dora)


def merge(cfg: LoRA, model: nn.Module, **options: Any) -> nn.Module:
    """Fold every B A into its base weight (see `ops.merge` for `safe` and `keep_layers`)."""
    return ops.merge(model, **options)


def unload(cfg: LoRA, model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: the base model as before `apply`."""
    return ops.unload(model)


def count(cfg: LoRA, model: nn.Module) -> dict[str, int]:
    """Trainable numbers per adapted module when `cfg` is applied to `model` (a meta-device skeleton will do):
    r * (d_in + d_out) per target layer, + d_out magnitudes for DoRA, + trained biases and modules_to_save."""
    return trainable_by_module(apply(cfg, model))


def inject(model: nn.Module, cfg: LoRA, paths: list[str], saved: list[str]) -> nn.Module:
    """Wrap `paths` in LoRA layers, freeze the rest, set bias modes and modules_to_save."""
    modules = dict(model.named_modules())
    for path in paths:
        _check_rank(path, modules[path], cfg.r)
    owners = find_param_targets(model, cfg.target_parameters) if cfg.target_parameters else {}
    for path in owners:
        if is_inside(path, saved) or any(is_inside(path, [p]) or is_inside(p, [path]) for p in paths):
            raise AdapterError(f"module {path!r} holds a target parameter but also lies in targets or "
                               "modules_to_save; adapt it one way only")
    model.requires_grad_(False)
    layer_type = DoRALayer if isinstance(cfg, DoRA) else LoRALayer
    state = AdapterState(method=copy.deepcopy(cfg), targets=list(paths), saved_modules=list(saved))
    for path in paths:  # model order, then the parameters: the same random-number use as peft
        layer = layer_type(modules[path], cfg.r, cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout, init=cfg.init)
        replace_module(model, path, layer)
    for path, names in owners.items():
        replace_module(model, path, ParamLoRA(modules[path], names, cfg.r, cfg.alpha, rslora=cfg.rslora,
                                              init=cfg.init))
    for path, param in _trained_biases(model, cfg.bias, paths, saved):
        state.bias_backup[path] = param.detach().clone()
        param.requires_grad_(True)
    for module_path in saved:
        _swap_in_trainable_copy(model, module_path, state)
    attach_state(model, state)
    return model


def _check_rank(path: str, module: nn.Module, r: int) -> None:
    kind = layer_kind(module)
    d_in, d_out = kind.dims(module.weight)
    if r > min(d_in, d_out):
        raise AdapterError(f"rank r={r} is larger than min(d_in, d_out) = {min(d_in, d_out)} of module {path!r} "
                           f"({type(module).__name__} {d_in} -> {d_out}); use r <= {min(d_in, d_out)}")


def _trained_biases(model: nn.Module, mode: str, paths: list[str], saved: list[str]):
    """(path, parameter) of the biases that train under bias `mode` (peft's rules)."""
    if mode == "none":
        return []
    if mode == "lora_only":
        return [(f"{p}.bias", model.get_submodule(p).bias) for p in paths if model.get_submodule(p).bias is not None]
    return [(n, p) for n, p in model.named_parameters()
            if (n == "bias" or n.endswith(".bias")) and not is_inside(n, saved)]


def _swap_in_trainable_copy(model: nn.Module, module_path: str, state: AdapterState) -> None:
    """Give a modules_to_save module trainable copies of its parameters, keeping the originals.

    Copies also untie a module from weights it shares (e.g. a tied lm_head), like peft's copy."""
    for name, param in list(model.get_submodule(module_path).named_parameters()):
        path = f"{module_path}.{name}"
        state.originals[path] = param
        set_parameter(model, path, nn.Parameter(param.detach().clone(), requires_grad=True))
