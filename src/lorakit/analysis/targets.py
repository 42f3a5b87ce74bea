"""A model without weights (its config, its skeleton) and the named target sets resolved on it.

`model_config(model)` reads a built-in preset (analysis/presets.py), a local folder, a hub id
('config.json' only) or 'embedded' into a transformers config; `skeleton(config)` builds that
model on the meta device: every module and parameter shape, no weights, so a method can be
applied to an 8B model in a fraction of a second. Presets and real configs go the same way.

Target sets: LoRA Without Regret (Schulman et al. 2025, Thinking Machines) found attention-only
LoRA under-performs MLP-only and all-linear LoRA at matched parameter counts. To compare the three
on any architecture, a set is resolved from the model's own linear layers: a layer belongs to
"attention" when a segment of its path names an attention block (attn, attention) and to "mlp"
when one names a feed-forward block (mlp, ffn, feed_forward). The result is a short list of
dotted suffixes (e.g. ["self_attn.q_proj", ..., "mlp.down_proj"]) that `find_targets` accepts.

"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lorakit import adapters
from lorakit.analysis.presets import PRESETS, preset_config
from lorakit.errors import ConfigError
from lorakit.models import resolve

ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward")


def _block_of(path: str, words: tuple[str, ...]) -> bool:
    return any(word in segment.lower() for segment in path.split(".")[:-1] for word in words)


def _suffixes(paths: Iterable[str]) -> list[str]:
    """'model.layers.0.self_attn.q_proj' -> 'self_attn.q_proj', deduplicated in model order."""
    out: list[str] = []
    for path in paths:
        suffix = ".".join(path.split(".")[-2:])
        if suffix not in out:
            out.append(suffix)
    return out


def attention_targets(linear_paths: list[str]) -> list[str]:
    """Suffixes of the linear layers inside attention blocks."""
    return _suffixes(p for p in linear_paths if _block_of(p, ATTENTION_WORDS))


def mlp_targets(linear_paths: list[str]) -> list[str]:
    """Suffixes of the linear layers inside feed-forward (MLP) blocks."""
    return _suffixes(p for p in linear_paths if _block_of(p, MLP_WORDS) and not _block_of(p, ATTENTION_WORDS))


# set name -> linear layer paths -> targets spec for LoRA
TARGET_SETS: dict[str, Callable[[list[str]], str | list[str]]] = {
    "all-linear": lambda paths: "all-linear",
    "attention": attention_targets,
    "mlp": mlp_targets,
}


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of every layer 'all-linear' selects (the output head excluded)."""
    return adapters.find_targets(model, "all-linear")


def resolve_target_set(name: str, model: nn.Module) -> str | list[str]:
    """The LoRA `targets` value for target set `name` on `model`."""
    if name not in TARGET_SETS:
        raise ConfigError(f"unknown target set {name!r}; expected one of {', '.join(TARGET_SETS)}")
    targets = TARGET_SETS[name](linear_paths(model))
    if not targets:
        raise ConfigError(f"target set {name!r} selects no layer of {type(model).__name__} "
                          f"(its linear layers: {', '.join(_suffixes(linear_paths(model)))})")
    return targets


def model_config(model: Any, trust_remote_code: bool = False) -> Any:
    """The transformers config of `model`: a config itself, a config dict (with model_type), a preset name, a
    local folder, a hub id or 'embedded' (only config.json is read, never the weights)."""
    if isinstance(model, PretrainedConfig):
        return model
    values = model if isinstance(model, Mapping) else preset_config(model)
    try:
        if values is not None:
            values = dict(values)
            return AutoConfig.for_model(values.pop("model_type", None), **values)
        path, local_only = resolve(model)
        return AutoConfig.from_pretrained(path, local_files_only=local_only, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = "" if values is not None else f" (not a preset: {', '.join(PRESETS)})"
        raise ConfigError(f"cannot read the config of {model!r}{where}: {str(error).splitlines()[0]}") from error


def skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of a transformers config, built on the meta device: module names and shapes, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def skeleton_model(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The skeleton of a preset, a local folder, a hub id or 'embedded' (see `model_config`)."""
    return skeleton(model_config(name_or_path, trust_remote_code), trust_remote_code)
