"""Which modules an adapter targets: one matching function with documented rules."""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.layers import LAYER_KINDS, LoRALayer, layer_kind, registered_parent
from lorakit.adapters.state import is_inside
from lorakit.errors import AdapterError, ConfigError

ALL_LINEAR = "all-linear"


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Dotted paths of the modules of `model` that `targets` selects, in model order.

    Rules (the same for a single string and for each entry of a list):
    - exact name: "model.layers.0.self_attn.q_proj" selects that module;
    - dotted suffix: "q_proj" or "self_attn.q_proj" selects every module whose path ends in
      "." + the spec, e.g. "q_proj" selects "model.layers.0.self_attn.q_proj";
    - regex full match: r".*\\.(q|v)_proj" selects paths that `re.fullmatch` it;
    - "all-linear" (the whole string, any case): every nn.Linear / transformers Conv1D except the
      output head (`model.get_output_embeddings()`), as peft does.
    A list selects the union of its entries. Every entry must select at least one module, else an
    AdapterError lists the closest module names; a selected module whose type LoRA cannot wrap
    (see `layers.LAYER_KINDS`) is an AdapterError naming it.
    """
    names = _candidate_names(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        selected = _all_linear(model, names)
    else:
        specs = [targets] if isinstance(targets, str) else list(targets)
        if not specs:
            raise ConfigError("targets is empty; name at least one module, or use 'all-linear'")
        selected = set()
        for spec in specs:
            hits = match_spec(spec, names)
            if not hits:
                raise AdapterError(_no_match_message(spec, names, model))
            selected.update(hits)
    modules = dict(model.named_modules())
    for name in names:
        if name in selected and layer_kind(modules[name]) is None:
            raise AdapterError(_unsupported_message(name, modules[name]))
    return [name for name in names if name in selected]


def match_spec(spec: str, names: Iterable[str]) -> list[str]:
    """The names one spec selects: exact name, dotted suffix, or regex full match."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a target must be a non-empty module name or pattern, got {spec!r}")
    try:
        pattern = re.compile(spec)
    except re.error:
        pattern = None  # not a regex: exact / suffix matching only
    return [n for n in names
            if n == spec or n.endswith("." + spec) or (pattern is not None and pattern.fullmatch(n))]


def resolve_modules_to_save(model: nn.Module, specs: list[str]) -> list[str]:
    """Paths of the modules named by `specs` (same rules as targets), outermost only."""
    names = [n for n, _ in model.named_modules() if n]
    found: set[str] = set()
    for spec in specs:
        hits = match_spec(spec, names)
        if not hits:
            raise AdapterError(f"modules_to_save entry {spec!r} matches no module of {type(model).__name__}")
        found.update(hits)
    return [n for n in names if n in found and not is_inside(n, found - {n})]


def compact_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """Short target names for an adapter config: the leaf names when, read with peft's list rules
    (exact or dotted suffix), they select exactly `paths`; otherwise the full paths."""
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    selected = {n for n in names if any(n == leaf or n.endswith("." + leaf) for leaf in leaves)}
    return leaves if selected == set(paths) else sorted(paths)


def _candidate_names(model: nn.Module) -> list[str]:
    """Every named submodule, skipping the insides of LoRA layers (their lora_A/lora_B)."""
    lora_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, LoRALayer))
    return [n for n, _ in model.named_modules() if n and not n.startswith(lora_prefixes)]


def _all_linear(model: nn.Module, names: list[str]) -> set[str]:
    """Linear-like modules minus the output head."""
    modules = dict(model.named_modules())
    linear = {n for n in names if isinstance(modules[n], (nn.Linear, Conv1D))}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    linear -= {n for n in linear if modules[n] is head}
    if not linear:
        raise AdapterError(f"'all-linear' found no linear layers in {type(model).__name__} "
                           "(besides the output head)")
    return linear


def _no_match_message(spec: str, names: list[str], model: nn.Module) -> str:
    leaves = sorted({n.rpartition(".")[2] for n in names})
    pool = leaves if "." not in spec else names
    close = difflib.get_close_matches(spec, pool, n=5, cutoff=0.5)
    if not close:  # nothing similar: show what could be targeted instead
        modules = dict(model.named_modules())
        close = sorted({n.rpartition(".")[2] for n in names if layer_kind(modules[n]) is not None})[:10]
        hint = "modules LoRA can wrap"
    else:
        hint = "closest module names"
    return (f"target {spec!r} matches no module of {type(model).__name__}; "
            f"{hint}: {', '.join(close)}")


def _unsupported_message(name: str, module: nn.Module) -> str:
    parent = registered_parent(module)
    if parent is not None:
        return (f"target module {name!r} has type {type(module).__name__}, a subclass of {parent.__name__} whose "
                f"forward does not compute {parent.__name__}'s output from its own weights, so LoRA cannot wrap "
                "it; leave it out of targets")
    supported = ", ".join(sorted(t.__name__ for t in LAYER_KINDS))
    return (f"target module {name!r} has type {type(module).__name__}, which LoRA cannot wrap; "
            f"supported layer types: {supported}")
