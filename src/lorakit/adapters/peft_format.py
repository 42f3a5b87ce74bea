"""Save and load LoRA adapters in PEFT's folder format.

A folder holds `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors`,
whose keys are the ones peft writes (checked against peft 0.21 in the tests):

    base_model.model.<module>.lora_A.weight        (r, d_in)
    base_model.model.<module>.lora_B.weight        (d_out, r)
    base_model.model.<module>.lora_magnitude_vector (d_out,)  DoRA's magnitude (use_dora: true)
    base_model.model.<module>.base_layer.bias      bias of an adapted module (bias 'all' / 'lora_only')
    base_model.model.<path>.bias                   other biases (bias 'all')
    base_model.model.<saved module>.<param>        modules_to_save, e.g. base_model.model.lm_head.weight
    base_model.model.<owner>[.base_layer...].lora_A.weight  (r * E, d_in)   target_parameters (MoE experts):
    base_model.model.<owner>[.base_layer...].lora_B.weight  (d_out, r * E)  see adapters/param_lora.py

In the live model the same tensors sit at `<module>.lora_A.weight`, `<module>.bias` and
`<saved module>.<param>`: the prefix is dropped and `base_layer.` is not used.
Weights are read with safetensors only; nothing is unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.adapters.config import DoRA, LoRA
from lorakit.adapters.match import compact_targets, resolve_modules_to_save
from lorakit.adapters.param_lora import find_param_targets, param_dims, param_lora_modules, peft_keys
from lorakit.adapters.peft_load import AdapterWeights, read_config, read_weights, validate
from lorakit.adapters.state import lora_layers, require_state
from lorakit.errors import AdapterError, ConfigError
from lorakit.permissions import share

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (see the module docstring)."""
    state = _require_lora(model)
    lora_paths = {path for path, _ in lora_layers(model)}
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        tensors[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight
        if isinstance(state.method, DoRA):
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for path, owner in param_lora_modules(model):
        for name, stem in peft_keys(path, owner.names).items():
            tensors[f"{PREFIX}{stem}.lora_A.weight"] = owner.lora_A[name].weight
            tensors[f"{PREFIX}{stem}.lora_B.weight"] = owner.lora_B[name].weight
    for param_path in state.bias_backup:
        module_path = param_path.rpartition(".")[0]
        key = f"{module_path}.base_layer.bias" if module_path in lora_paths else param_path
        tensors[PREFIX + key] = model.get_parameter(param_path)
    for module_path in state.saved_modules:
        for name, param in model.get_submodule(module_path).named_parameters():
            tensors[f"{PREFIX}{module_path}.{name}"] = param
    return {key: t.detach().contiguous() for key, t in tensors.items()}


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json content: peft's LoraConfig fields for this adapter."""
    state = _require_lora(model)
    cfg: LoRA = state.method
    layers = [layer for _, layer in lora_layers(model)]
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(model), "revision": None,
        "inference_mode": True,
        "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": compact_targets(model, state.targets) if state.targets else None,
        "target_parameters": sorted(cfg.target_parameters) or None, "exclude_modules": None,
        "bias": cfg.bias, "modules_to_save": list(state.saved_modules) or None,
        "fan_in_fan_out": any(layer.kind.fan_in_fan_out for layer in layers),
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": isinstance(cfg, DoRA), "lora_bias": False,
    }


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapter as a PEFT folder at `path`; returns the folder.

    `base_model_name_or_path` is recorded in the config (default: the model's own name_or_path).
    """
    folder = Path(path)
    config = adapter_config(model, base_model_name_or_path)
    tensors = {key: t.cpu() for key, t in adapter_state_dict(model).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    share(folder / WEIGHTS_NAME)  # save_file writes 0600 whatever the umask: a shared adapter follows it
    return folder


@dataclass
class PeftFolder:
    """A PEFT LoRA folder read and checked against a base model, before the model is touched."""

    cfg: LoRA  # LoRA, or DoRA when use_dora
    paths: list[str]  # the modules its weights adapt
    saved: list[str]  # its modules_to_save, as paths of the base model
    weights: AdapterWeights
    param_weights: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_folder(base_model: nn.Module, folder: Path, *, named: bool = False) -> PeftFolder:
    """Read a PEFT-format LoRA / DoRA folder (saved by lorakit or peft) and check it fits `base_model`.

    Everything is checked here: the config's peft_type and features, the safetensors file, and that
    every module and shape fits the base model. `named`: for a named (per-row) adapter, which takes no
    modules_to_save or expert parameters."""
    raw = read_config(folder / CONFIG_NAME, parameters=not named)
    weights = read_weights(folder / WEIGHTS_NAME, prefix=PREFIX)
    param_weights = {} if named else _take_param_weights(base_model, weights, raw, folder)
    cfg = _lora_config(raw, targets=list(weights.lora), source=folder / CONFIG_NAME)
    try:
        saved = [] if named else resolve_modules_to_save(base_model, cfg.modules_to_save)
    except AdapterError as error:
        raise AdapterError(f"{folder / CONFIG_NAME}: {error}") from error
    paths = validate(base_model, weights, raw, saved, source=folder / WEIGHTS_NAME)
    return PeftFolder(cfg, paths, saved, weights, param_weights)


def _take_param_weights(model: nn.Module, weights: AdapterWeights, raw: dict, folder: Path
                        ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Move the target_parameters pairs out of `weights.lora`, keyed (owner path, parameter), checked."""
    specs = raw.get("target_parameters") or []
    if not specs:
        return {}
    try:
        owners = find_param_targets(model, specs)
    except AdapterError as error:
        raise AdapterError(f"{folder / CONFIG_NAME}: {error}") from error
    taken = {}
    for path, names in owners.items():
        module = model.get_submodule(path)
        for name, stem in peft_keys(path, names).items():
            pair = weights.lora.pop(stem, None)
            if pair is None:
                raise AdapterError(f"{folder / WEIGHTS_NAME}: target parameter {path}.{name} has no LoRA weights "
                                   f"(expected {PREFIX}{stem}.lora_A.weight)")
            experts, d_in, d_out = param_dims(module, name)
            want = ((raw["r"] * experts, d_in), (d_out, raw["r"] * experts))
            if (tuple(pair[0].shape), tuple(pair[1].shape)) != want:
                raise AdapterError(f"{folder / WEIGHTS_NAME}: LoRA weights of parameter {path}.{name} are "
                                   f"{tuple(pair[0].shape)} / {tuple(pair[1].shape)}, but r={raw['r']} on "
                                   f"{experts} experts of {d_in} -> {d_out} needs {want[0]} / {want[1]}")
            taken[(path, name)] = pair
    return taken


def _lora_config(raw: dict, targets: list[str], source: Path) -> LoRA:
    """The LoRA config an adapter_config.json describes (targets: the modules with weights)."""
    method = DoRA if raw.get("use_dora") else LoRA
    try:
        return method(r=raw["r"], alpha=raw.get("lora_alpha", 8), targets=targets,
                      target_parameters=list(raw.get("target_parameters") or []),
                      dropout=raw.get("lora_dropout", 0.0), bias=raw.get("bias", "none"),
                    rslora=bool(raw.get("use_rslora", False)),
                    modules_to_save=list(raw.get("modules_to_save") or []),
                    init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming")
    except ConfigError as error:
        raise AdapterError(f"{source}: {error}") from error


def copy_in(model: nn.Module, found: PeftFolder) -> None:
    """Copy a checked folder's tensors into the LoRA layers `found.cfg` was injected as."""
    weights, param_weights = found.weights, found.param_weights
    with torch.no_grad():
        for (path, name), (A, B) in param_weights.items():  # target_parameters (MoE experts)
            owner = model.get_submodule(path)
            owner.lora_A[name].weight.copy_(A)
            owner.lora_B[name].weight.copy_(B)
        for path, (A, B) in weights.lora.items():
            layer = model.get_submodule(path)
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
            if path in weights.magnitude:
                layer.lora_magnitude_vector.copy_(weights.magnitude[path])
        for param_path, tensor in weights.params.items():
            model.get_parameter(param_path).copy_(tensor)


def _require_lora(model: nn.Module):
    state = require_state(model)
    if not isinstance(state.method, LoRA):
        raise AdapterError(f"the '{state.method.name}' method has no LoRA adapter to save; "
                           "save the whole model with model.save_pretrained instead")
    return state


def _name_or_path(model: nn.Module) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None
