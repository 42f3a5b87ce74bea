"""LoRA projections that read the same input compute their down-projections A x in one matmul.

In a decoder layer q_proj, k_proj and v_proj (and gate_proj, up_proj) are called one after the
other on the same tensor. Each LoRA branch starts with a thin matmul x A_i^T of shape
(N, d_in) x (d_in, r). `fuse_shared_inputs(model)` groups such sibling `LoRALayer`s: the first
of a group to see an input computes x [A_1; A_2; ...]^T once, (N, d_in) x (d_in, r_1 + r_2 + ...),
and every member takes its own columns. Autograd splits the gradient back onto each A_i.

This is a fast path behind the plain `LoRALayer.forward`, which stays the reference (the
tests compare both); `unfuse(model)` restores it. Only layers without dropout are grouped:
each layer would draw its own dropout mask, so their inputs are not the same tensor.
"""
from __future__ import annotations

import types
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.layers import LoRALayer

# sibling projection names that models call on one shared input (Llama, Mistral, Qwen, ...)
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedDown:
    """The concatenated down-projection of a group of LoRA layers, computed once per input."""

    def __init__(self, layers: list[LoRALayer]) -> None:
        self.layers = layers
        self.bounds = [0]
        for layer in layers:
            self.bounds.append(self.bounds[-1] + layer.r)
        self._key: tuple | None = None  # (weakref to the input, versions of the A weights)
        self._down: torch.Tensor | None = None

    def _versions(self) -> tuple[int, ...]:
        return tuple(layer.lora_A.weight._version for layer in self.layers)

    def down(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """x A_index^T, taken from one matmul per (input, weights) pair: (..., d_in) -> (..., r)."""
        key = self._key
        if key is None or key[0]() is not x or key[1] != self._versions():
            stacked = torch.cat([layer.lora_A.weight for layer in self.layers])  # (sum r, d_in)
            inputs = x if torch.is_autocast_enabled(x.device.type) or x.dtype == stacked.dtype else x.to(stacked.dtype)
            self._down = F.linear(inputs, stacked)  # (..., sum r)
            self._key = (weakref.ref(x), self._versions())
        return self._down[..., self.bounds[index]:self.bounds[index + 1]]


def _fused_forward(group: SharedDown, index: int) -> Callable[[LoRALayer, torch.Tensor], torch.Tensor]:
    def forward(self: LoRALayer, x: torch.Tensor) -> torch.Tensor:
        result = self.kind.forward(x, self.weight, self.bias)  # (..., d_out)
        if self.merged:
            return result
        branch = F.linear(group.down(index, x), self.lora_B.weight) * self.scaling  # (..., d_out)
        return (result + branch).to(result.dtype)

    return forward


def _groups(model: nn.Module) -> list[list[LoRALayer]]:
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUTS:
            members = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, LoRALayer) for m in members) and \
                    all(isinstance(m.lora_dropout, nn.Identity) for m in members) and \
                    len({(m.in_features, m.lora_A.weight.dtype) for m in members}) == 1:
                groups.append(members)
    return groups


def fuse_shared_inputs(model: nn.Module) -> int:
    """Group sibling LoRA projections that share an input; returns the number of groups fused."""
    groups = _groups(model)
    for members in groups:
        shared = SharedDown(members)
        for index, layer in enumerate(members):
            layer.forward = types.MethodType(_fused_forward(shared, index), layer)
    return len(groups)


def unfuse(model: nn.Module) -> None:
    """Back to the plain LoRALayer.forward everywhere."""
    for module in model.modules():
        if isinstance(module, LoRALayer) and "forward" in module.__dict__:
            del module.forward
