"""Trainable-parameter counts and the report that shows them."""
from __future__ import annotations

from torch import nn

from lorakit.adapters.layers import LoRALayer, StandIn
from lorakit.adapters.param_lora import ParamLoRA
from lorakit.adapters.state import get_state


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared (tied) tensor counted once.

    The total includes the frozen originals kept for modules_to_save (they stay in memory so
    `unload` can restore them), the same accounting as peft's `get_nb_trainable_parameters`.
    """
    params = list(model.parameters())
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    return trainable, sum(_numel(p) for p in params) + _kept_originals(model)


def trainable_by_module(model: nn.Module) -> dict[str, int]:
    """Trainable numbers per module name, in model order: an adapter layer's A, B (and DoRA's m, MoLE's
    experts and router) count toward the module it wraps, e.g. "q_proj"; a module that names its own
    report group (a bottleneck adapter, virtual tokens) toward that group; any other trainable tensor toward
    the module holding it ("embed_tokens", "input_layernorm", "lm_head"). A name used under different parents
    (GPT-2's attn.c_proj and mlp.c_proj) keeps its parent. Tied tensors count once."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, StandIn)]
    named_groups = {n: m.report_group for n, m in model.named_modules()
                    if isinstance(getattr(m, "report_group", None), str) and not isinstance(m, StandIn)}
    owners: dict[str, int] = {}
    seen: set[int] = set()
    for path, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        module_path = path.rpartition(".")[0]
        wrapper = max((w for w in wrappers if module_path == w or module_path.startswith(w + ".")), key=len,
                      default=None)
        group = next((named_groups[p] for p in named_groups if module_path == p or module_path.startswith(p + ".")),
                     None)
        owner = wrapper or module_path
        key = group or owner
        owners[key] = owners.get(key, 0) + _numel(param)
    return _short_names(owners, set(named_groups.values()))


def _short_names(by_path: dict[str, int], keep: set[str]) -> dict[str, int]:
    """Module path -> count, regrouped by leaf name (parent.leaf where a leaf sits under several parents;
    layer indices are not parents: every layer's input_layernorm is one group)."""
    def parent_leaf(path: str) -> tuple[str, str]:
        words = [w for w in path.split(".") if not w.isdigit()]
        return (words[-2] if len(words) > 1 else ""), words[-1]

    parents: dict[str, set[str]] = {}
    for path in by_path:
        if path not in keep:
            parent, leaf = parent_leaf(path)
            parents.setdefault(leaf, set()).add(parent)
    groups: dict[str, int] = {}
    for path, count in by_path.items():
        parent, leaf = parent_leaf(path) if path not in keep else ("", path)
        key = path if path in keep else (f"{parent}.{leaf}" if len(parents[leaf]) > 1 else leaf)
        groups[key] = groups.get(key, 0) + count
    return groups


def parameter_report(model: nn.Module) -> str:
    """Trainable / total / percent, then counts per module type."""
    trainable, total = trainable_parameters(model)
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {_percent(trainable, total)}",
             f"{'module type':<28}{'modules':>8}{'trainable':>14}{'total':>14}"]
    for group, (count, group_trainable, group_total) in _by_module_type(model).items():
        lines.append(f"{group:<28}{count:>8,}{group_trainable:>14,}{group_total:>14,}")
    kept = _kept_originals(model)
    if kept:
        lines.append(f"{'originals of modules_to_save':<28}{'':>8}{0:>14,}{kept:>14,}")
    return "\n".join(lines)


def _numel(param) -> int:
    # bitsandbytes packs two 4-bit values per byte of storage: count the logical weights
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.4f}" if whole else "0.0000"


def _kept_originals(model: nn.Module) -> int:
    """Numbers held by modules_to_save originals that are no longer model parameters."""
    state = get_state(model)
    if state is None:
        return 0
    live = {id(p) for p in model.parameters()}
    kept = {id(p): p for p in state.originals.values() if id(p) not in live}
    return sum(_numel(p) for p in kept.values())


def _module_group(name: str, module: nn.Module, lora_paths: set[str], named_groups: dict[str, str]) -> str:
    """Report group of a module: LoRA A/B, a wrapped base layer, a module that names its own group
    (`report_group`, e.g. a bottleneck adapter) with its children, or its own class."""
    parent = name.rpartition(".")[0]
    if name in named_groups or parent in named_groups:
        return named_groups.get(name) or named_groups[parent]
    if parent in lora_paths and name.rpartition(".")[2] in ("lora_A", "lora_B"):
        return "LoRA A+B"
    holder, _, part = parent.rpartition(".")
    if holder in lora_paths and part in ("lora_A", "lora_B"):  # ParamLoRA: lora_A.<parameter>
        return "LoRA A+B"
    if isinstance(module, LoRALayer):
        return f"{module.base_type.__name__} ({type(module).__name__.removesuffix('Layer')} base)"  # DoRA: + m
    if isinstance(module, ParamLoRA):
        return f"{type(module._base).__name__} (LoRA base)"
    return type(module).__name__


def _by_module_type(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """group -> (modules holding parameters, trainable, total), biggest total first."""
    lora_paths = {n for n, m in model.named_modules() if isinstance(m, (LoRALayer, ParamLoRA))}
    named_groups = {n: m.report_group for n, m in model.named_modules()
                    if isinstance(getattr(m, "report_group", None), str)}
    seen: set[int] = set()
    groups: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        row = groups.setdefault(_module_group(name, module, lora_paths, named_groups), [0, 0, 0])
        row[0] += 1
        row[1] += sum(_numel(p) for p in own if p.requires_grad)
        row[2] += sum(_numel(p) for p in own)
    return {k: tuple(v) for k, v in sorted(groups.items(), key=lambda kv: -kv[1][2])}
