"""Trainable-parameter counts and the report that shows them."""
from __future__ import annotations

from torch import nn

from lorakit.adapters.layers import LoRALayer
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
