"""Named target sets for sweeps: attention-only, MLP-only, all-linear.

LoRA Without Regret (Schulman et al. 2025, Thinking Machines) found attention-only LoRA
under-performs MLP-only and all-linear LoRA at matched parameter counts. To compare the three on
any architecture, a set is resolved from the model's own linear layers: a layer belongs to
"attention" when a segment of its path names an attention block (attn, attention) and to "mlp"
when one names a feed-forward block (mlp, ffn, feed_forward). The result is a short list of
dotted suffixes (e.g. ["self_attn.q_proj", ..., "mlp.down_proj"]) that `find_targets` accepts.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from lorakit.errors import ConfigError

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
    from lorakit.adapters.match import find_targets

    return find_targets(model, "all-linear")


def resolve_target_set(name: str, model: nn.Module) -> str | list[str]:
    """The LoRA `targets` value for target set `name` on `model`."""
    if name not in TARGET_SETS:
        raise ConfigError(f"unknown target set {name!r}; expected one of {', '.join(TARGET_SETS)}")
    targets = TARGET_SETS[name](linear_paths(model))
    if not targets:
        raise ConfigError(f"target set {name!r} selects no layer of {type(model).__name__} "
                          f"(its linear layers: {', '.join(_suffixes(linear_paths(model)))})")
    return targets


def skeleton_model(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The model built from its config on the meta device: module names and shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.models import resolve

    path, local_only = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path, local_files_only=local_only, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
