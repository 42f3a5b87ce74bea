"""A single LoRA adapter during a decode call: each layer's own arithmetic without its bookkeeping, or merged.

`lean_lora(model)` gives each LoRA layer (`lorakit.apply` / `load_adapter`) a forward for the block
that runs the class's own ops in their order from locals, skipping the per-call attribute lookups
and checks (bitwise the same output; the class forward still runs wherever its checks matter:
adapter switched off, training, autocast). With `merge=True` each layer computes with a copy of
W + s*B*A made for the block instead: one product per layer instead of three. The parameters are
never written to. Merging is for float32/float64 bases (its rounding differs from the branch at
float32 level; half-precision and quantised bases stay unmerged) whose copies fit in half the free
memory; `merge_pays` says when a call saves more LoRA work than the copy costs.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lorakit.adapters.layers import LoRALayer
from lorakit.decoding.kv_cache import length_groups

# Rough costs on one CPU thread, from benchmarks/infer_paths.py's model (benchmarks/RESULTS.md, Inference): the
# merged copy streams the adapted weights (MERGE_BYTES_PER_S), and each LoRA branch costs per-call overhead per
# forward (LAYER_CALL_S) plus its thin products (LORA_FLOPS_PER_S).
MERGE_BYTES_PER_S = 1.4e9
LAYER_CALL_S = 35e-6
LORA_FLOPS_PER_S = 20e9


def _lora_layers(model) -> list:
    return [m for m in model.modules() if type(m) is LoRALayer]


def _mergeable(layers: list) -> bool:
    """True when W + s*B*A can stand in for every layer's branch: plain LoRA on float32 / float64 weights (the
    adapter in the same dtype; half-precision and quantised bases stay unmerged), in eval mode, switched on, and
    the copies fit in half the free memory."""
    if not layers or not all(
            type(layer.weight) is torch.nn.Parameter and layer.weight.dtype in (torch.float32, torch.float64)
            and layer.lora_A.weight.dtype == layer.weight.dtype and not layer.merged and not layer.training
            and getattr(layer, "adapter_enabled", True) for layer in layers):
        return False
    free = free_memory(layers[0].weight.device)
    return free is None or 2 * sum(layer.weight.numel() * layer.weight.element_size() for layer in layers) <= free


def free_memory(device: torch.device) -> int | None:
    """Bytes available on `device` (Linux MemAvailable for the CPU), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def _lean_forward(layer, merged: torch.Tensor | None):
    """`layer`'s forward for a decode call: the class's own ops in its order (bitwise the same output) read from
    locals, or with `merged` (W + s*B*A) one product; the class forward wherever its bookkeeping could matter
    (adapter switched off, training with dropout, autocast)."""
    forward, weight, bias = layer.kind.forward, layer.weight, layer.bias
    A, B, scale = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    plain = type(layer).forward

    def lean(x: torch.Tensor) -> torch.Tensor:
        if (layer.merged or not getattr(layer, "adapter_enabled", True) or layer.training
                or torch.is_autocast_enabled(x.device.type)):
            return plain(layer, x)
        if merged is not None:
            return forward(x, merged, bias)
        result = forward(x, weight, bias)  # (..., d_out)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        return (result + F.linear(F.linear(x, A), B) * scale).to(result.dtype)  # lora_math.lora_branch
    return lean


@contextmanager
def lean_lora(model, merge: bool = False) -> Iterator[bool]:
    """Inside the block, each LoRA layer of `model` (`lorakit.apply` / `load_adapter`) runs `_lean_forward`: the
    same ops as its forward, or with `merge` (where `_mergeable`) a copy of W + s*B*A made for the block. The
    parameters are never written to. Yields whether it merged."""
    layers = _lora_layers(model)
    merge = merge and _mergeable(layers)
    try:
        for layer in layers:
            layer.forward = _lean_forward(layer, _merged_weight(layer) if merge else None)
        yield merge
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def merge_pays(model, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> bool:
    """True when merging a single LoRA adapter for a decode call (`lean_lora(merge=True)`) should save more than
    the copy costs: the branches' per-call overhead over every forward plus their products over every token,
    against a pass over the adapted weights (on a GPU, copies are cheap: always)."""
    layers = _lora_layers(model)
    if not layers or max(max_new_tokens) <= 1:
        return False
    if layers[0].weight.device.type != "cpu":
        return True
    forwards = len(length_groups([len(p) for p in prompts])) + max(max_new_tokens) - 1
    tokens = sum(map(len, prompts)) + sum(max(0, budget - 1) for budget in max_new_tokens)
    lora_flops = 2 * tokens * sum(layer.r * (layer.in_features + layer.out_features) for layer in layers)
    saved = forwards * len(layers) * LAYER_CALL_S + lora_flops / LORA_FLOPS_PER_S
    cost = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers) / MERGE_BYTES_PER_S
    return saved > cost


def _merged_weight(layer) -> torch.Tensor:
    """W + s * B A in W's layout, as one fused product (lora_math.merge_weight's value up to float rounding)."""
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    if layer.kind.fan_in_fan_out:  # W stored (d_in, d_out)
        return torch.addmm(layer.weight.detach(), A.t(), B.t(), alpha=layer.scaling)
    return torch.addmm(layer.weight.detach(), B, A, alpha=layer.scaling)
