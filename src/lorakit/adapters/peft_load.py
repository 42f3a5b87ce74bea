"""Reading a PEFT LoRA folder, and checking it against a base model before anything changes.

Every problem is an AdapterError naming the file, key or module at fault and, for shapes,
both the adapter's and the base model's sizes.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.adapters.jsonfile import read_json_object
from lorakit.adapters.layers import layer_kind
from lorakit.adapters.match import ALL_LINEAR
from lorakit.adapters.state import is_inside
from lorakit.errors import AdapterError

# peft features that change the math or the base weights; lorakit refuses them rather than
# silently computing something else
_UNSUPPORTED = ("lora_bias", "rank_pattern", "alpha_pattern", "layer_replication",
                "trainable_token_indices", "alora_invocation_tokens", "use_qalora")
# init_lora_weights values under which peft rewrites the base weights (PiSSA, OLoRA, LoftQ, ...)
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


@dataclass
class AdapterWeights:
    """The tensors of an adapter file, keyed by live-model paths."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Module path -> (A (r, d_in), B (d_out, r))."""
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    """Model parameter path -> tensor: trained biases and modules_to_save parameters."""
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    """Module path -> DoRA magnitude m (d_out,) (adapters saved with use_dora: true)."""


def read_config(path: Path, parameters: bool = False) -> dict:
    """adapter_config.json as a dict, refusing anything that is not a plain LoRA adapter.

    `parameters`: the caller reads target_parameters (LoRA on MoE experts); other callers refuse it.
    """
    if not path.parent.is_dir():
        raise AdapterError(f"adapter folder {str(path.parent)!r} does not exist")
    raw = read_json_object(path, "a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {raw.get('peft_type')!r}; lorakit.load_adapter reads LoRA "
                           "adapters (peft_type 'LORA'), prompt tuning ('PROMPT_TUNING') and lorakit's own "
                           "folders ('lorakit_method')")
    if raw.get("target_parameters") and not parameters:
        raise AdapterError(f"{path}: the adapter adapts parameters (target_parameters, e.g. MoE experts), which "
                           "named and per-row adapters (compare, serve) do not support yet; merge it first "
                           "(lorakit merge ADAPTER OUT, then use OUT as the model) or load it alone "
                           "(generate --adapter, lorakit.load_adapter)")
    used = [name for name in _UNSUPPORTED if raw.get(name)]
    if used:
        raise AdapterError(f"{path}: the adapter uses {', '.join(used)}, which lorakit's LoRA does not support")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"{path}: init_lora_weights={init!r} rewrites the base weights, so this adapter does "
                           "not fit the plain base model; convert it to a plain LoRA adapter with peft first")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    return raw


def read_weights(path: Path, prefix: str) -> AdapterWeights:
    """The adapter's tensors (safetensors only), sorted into LoRA pairs and plain parameters."""
    if not path.is_file():
        pickle_file = path.with_name("adapter_model.bin")
        if pickle_file.is_file():
            raise AdapterError(f"{path} not found, only {pickle_file.name}: lorakit reads safetensors only and never "
                               "unpickles weights; re-save the adapter with safe_serialization=True")
        raise AdapterError(f"{path} not found; the adapter folder has no weights file")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors reports corrupt and truncated files as its own error type
        raise AdapterError(f"cannot read {path}: {error}; the file is corrupt or truncated, save or "
                           "download it again") from error
    return _sort_keys(tensors, prefix, path)


def _sort_keys(tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> AdapterWeights:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    weights = AdapterWeights()
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            raise AdapterError(f"{source}: key {key!r} does not start with {prefix!r}; this is not a PEFT LoRA "
                               "adapter for a causal LM")
        name = key[len(prefix):]
        part = next((p for p in ("lora_A", "lora_B") if name.endswith(f".{p}.weight")), None)
        if part is not None:
            halves.setdefault(name[: -len(f".{part}.weight")], {})[part] = tensor
        elif name.endswith(".lora_magnitude_vector"):
            weights.magnitude[name[: -len(".lora_magnitude_vector")]] = tensor
        elif ".original_module." in name:
            continue  # peft's frozen copy of a modules_to_save module (bias='all'); the base has it already
        elif name.endswith(".base_layer.bias"):
            weights.params[name[: -len(".base_layer.bias")] + ".bias"] = tensor
        else:
            weights.params[name] = tensor
    for module, pair in halves.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise AdapterError(f"{source}: module {module!r} has no {missing} weight")
        weights.lora[module] = (pair["lora_A"], pair["lora_B"])
    if not weights.lora:
        raise AdapterError(f"{source} holds no lora_A / lora_B weights")
    return weights


def validate(model: nn.Module, weights: AdapterWeights, raw: dict, saved: list[str], source: Path) -> list[str]:
    """Check every tensor against the base model; return the adapted module paths in model order."""
    modules = dict(model.named_modules())
    r, target_modules = raw["r"], raw.get("target_modules")
    for path, (A, B) in weights.lora.items():
        module = modules.get(path)
        if module is None:
            close = difflib.get_close_matches(path, list(modules), n=3, cutoff=0.6)
            hint = f"; closest module names: {', '.join(close)}" if close else ""
            raise AdapterError(f"{source}: the adapter has LoRA weights for module {path!r}, which "
                               f"{type(model).__name__} does not have{hint}")
        kind = layer_kind(module)
        if kind is None:
            raise AdapterError(f"{source}: module {path!r} has type {type(module).__name__}, which LoRA cannot wrap")
        d_in, d_out = kind.dims(module.weight)
        if tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
            raise AdapterError(f"{source}: LoRA weights for module {path!r} do not fit the base model: lora_A is "
                               f"{tuple(A.shape)} and lora_B is {tuple(B.shape)}, but the base layer maps "
                               f"{d_in} -> {d_out}, so r={r} needs lora_A {(r, d_in)} and lora_B {(d_out, r)}")
        if target_modules is not None and not _peft_selects(target_modules, path):
            raise AdapterError(f"{source}: module {path!r} has LoRA weights but adapter_config.json's "
                               f"target_modules {target_modules!r} does not select it")
    _validate_magnitudes(weights, bool(raw.get("use_dora")), source)
    _validate_params(model, weights, raw.get("bias", "none"), saved, source)
    return [name for name in modules if name in weights.lora]


def _validate_magnitudes(weights: AdapterWeights, use_dora: bool, source: Path) -> None:
    """DoRA adapters need one magnitude (d_out,) per LoRA module; plain LoRA adapters have none."""
    if not use_dora and weights.magnitude:
        raise AdapterError(f"{source}: {next(iter(weights.magnitude))!r} has a lora_magnitude_vector but "
                           "adapter_config.json does not set use_dora: true")
    for path, (_, B) in weights.lora.items() if use_dora else ():
        magnitude = weights.magnitude.get(path)
        if magnitude is None:
            raise AdapterError(f"{source}: use_dora is true but module {path!r} has no lora_magnitude_vector")
        if tuple(magnitude.shape) != (B.shape[0],):
            raise AdapterError(f"{source}: lora_magnitude_vector of module {path!r} is {tuple(magnitude.shape)}, "
                               f"but the layer has {B.shape[0]} outputs, so it must be ({B.shape[0]},)")


def _validate_params(model: nn.Module, weights: AdapterWeights, bias: str, saved: list[str], source: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for path, tensor in weights.params.items():
        owner = path.rpartition(".")[0]
        is_bias = path.endswith(".bias") and (bias == "all" or (bias == "lora_only" and owner in weights.lora))
        if path not in params or not (is_bias or is_inside(path, saved)):
            raise AdapterError(f"{source}: unexpected key {path!r}: it is neither a LoRA weight, nor a trained bias "
                               f"(bias={bias!r}), nor a parameter of modules_to_save {saved}")
        if tuple(params[path].shape) != tuple(tensor.shape):
            raise AdapterError(f"{source}: {path!r} is {tuple(tensor.shape)} in the adapter but "
                               f"{tuple(params[path].shape)} in the base model")


def _peft_selects(target_modules, path: str) -> bool:
    """peft's rule: a string is 'all-linear' or a regex (full match); a list holds names or suffixes."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return True
        try:
            return re.fullmatch(target_modules, path) is not None
        except re.error as error:
            raise AdapterError(f"adapter_config.json: target_modules {target_modules!r} is not a valid "
                               f"regular expression ({error})") from error
    return any(path == t or path.endswith("." + t) for t in target_modules)
