"""Trainable parameters of each method, from a ModelShape alone (no model is built).

Formulas (L decoder layers; a target layer is d_in -> d_out):
- full: every parameter.
- LoRA (Hu et al. 2021): r * (d_in + d_out) per target layer (A is r x d_in, B is d_out x r).
- QLoRA (Dettmers et al. 2023): the same adapters as LoRA; only the frozen base is stored in 4 bits.
- DoRA (Liu et al. 2024): LoRA plus one magnitude per output row, d_out per target layer.
- prompt tuning (Lester et al. 2021): num_virtual_tokens * hidden_size.
The result maps a module type (e.g. "q_proj", "embedding") to its trainable count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from lorakit.analysis.shapes import Linear, ModelShape
from lorakit.errors import ConfigError

TARGET_BLOCKS = {"attention": "attention", "mlp": "mlp"}


@dataclass(frozen=True)
class MethodSpec:
    """What the calculator needs to know about a method."""

    name: str  # full, lora, qlora, dora, prompt_tuning
    r: int = 16
    targets: str | Sequence[str] = "all-linear"  # all-linear, attention, mlp, or module names
    num_virtual_tokens: int = 20


def _selects(spec: str, linear: Linear) -> bool:
    """A target name selects a layer by leaf name; a dotted prefix ('mlp.c_proj') also fixes the block."""
    prefix, _, leaf = spec.rpartition(".")
    if leaf != linear.name:
        return False
    return not prefix or any(word in prefix.lower() for word in
                             (("attn", "attention") if linear.block == "attention" else ("mlp", "ffn")))


def target_linears(shape: ModelShape, targets: str | Sequence[str]) -> list[Linear]:
    """The per-layer linear layers a targets value selects."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return list(shape.linears)
    if isinstance(targets, str) and targets in TARGET_BLOCKS:
        return [l for l in shape.linears if l.block == TARGET_BLOCKS[targets]]
    specs = [targets] if isinstance(targets, str) else list(targets)
    chosen = [l for l in shape.linears if any(_selects(spec, l) for spec in specs)]
    for spec in specs:
        if not any(_selects(spec, l) for l in shape.linears):
            names = ", ".join(dict.fromkeys(l.name for l in shape.linears))
            raise ConfigError(f"target {spec!r} matches no layer of this {shape.model_type} model "
                              f"(its linear layers: {names}; or all-linear, attention, mlp)")
    return chosen


def _group(linear: Linear) -> str:
    return f"{linear.block}.{linear.name}" if linear.name == "c_proj" else linear.name


def _full(shape: ModelShape, spec: MethodSpec) -> dict[str, int]:
    groups: dict[str, int] = {"embedding": shape.embedding_params}
    for linear in shape.linears:
        key = _group(linear)
        groups[key] = groups.get(key, 0) + shape.num_layers * (linear.d_in * linear.d_out
                                                               + (linear.d_out if linear.bias else 0))
    groups["norms"] = shape.num_layers * shape.norm_params_per_layer + shape.other_norm_params
    if shape.head_params:
        groups["lm_head"] = shape.head_params
    return groups


def _low_rank(shape: ModelShape, spec: MethodSpec, magnitude: bool = False) -> dict[str, int]:
    if spec.r < 1:
        raise ConfigError(f"LoRA rank r must be >= 1 (got {spec.r})")
    groups: dict[str, int] = {}
    for linear in target_linears(shape, spec.targets):
        count = spec.r * (linear.d_in + linear.d_out) + (linear.d_out if magnitude else 0)
        groups[_group(linear)] = groups.get(_group(linear), 0) + shape.num_layers * count
    return groups


def _prompt(shape: ModelShape, spec: MethodSpec) -> dict[str, int]:
    return {"virtual tokens": spec.num_virtual_tokens * shape.hidden_size}


# method name -> (shape, spec) -> {module type: trainable count}
PARAM_FORMULAS: dict[str, Callable[[ModelShape, MethodSpec], dict[str, int]]] = {
    "full": _full,
    "lora": _low_rank,
    "qlora": _low_rank,
    "dora": lambda shape, spec: _low_rank(shape, spec, magnitude=True),
    "prompt_tuning": _prompt,
}


def trainable_by_module(shape: ModelShape, spec: MethodSpec) -> dict[str, int]:
    """Trainable parameters per module type for `spec` on `shape`."""
    if spec.name not in PARAM_FORMULAS:
        raise ConfigError(f"unknown method {spec.name!r}; expected one of {', '.join(PARAM_FORMULAS)}")
    return PARAM_FORMULAS[spec.name](shape, spec)


def trainable_count(shape: ModelShape, spec: MethodSpec) -> int:
    """Total trainable parameters."""
    return sum(trainable_by_module(shape, spec).values())


def lora_matrix_count(d_in: int, d_out: int, r: int) -> tuple[int, int]:
    """(full matrix entries, LoRA entries) for one d_in x d_out layer: the lecture's Exercise 1."""
    from lorakit.adapters.lora_math import lora_param_count

    return d_in * d_out, lora_param_count(d_in, d_out, r)
