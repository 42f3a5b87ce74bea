"""The named adapters of `adapters.multi`: what a folder becomes when it is added by name.

Each method's `named(model, name, folder, raw)` (adapters/registry.py) returns one of these:

- `NamedLoRA` (LoRA, DoRA): per module path the pair A, B and the scale; the bank adds s * B (A x)
  per row, stacked for the rows of a batch (DoRA: rescaled with factors frozen at load, dora.py);
- `NamedDeltas` (bottleneck, MoLE): per hooked module path a function (x, y) -> the amount added
  to that module's output y (x: the module's input); the adapter modules stay off the model's
  module tree, so the base model is not changed;
- `NamedPrompt` (prompt tuning): its virtual tokens, which the prompt hooks
  (`prompt_tuning.attach_prompt_hooks`) put in front of the rows that use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lorakit.adapters.lora_math import lora_branch

Delta = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]  # (module input, module output) -> added


@dataclass
class NamedLoRA:
    """One named adapter: module path -> (A (r, d_in), B (d_out, r)) and its scaling."""

    name: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    source: str = ""
    dora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """DoRA modules: path -> (g = m / ||W + s B A|| (d_out,), (1 - g) * bias (d_out,)), fixed at load time."""

    @property
    def paths(self) -> list[str]:
        """The module paths this adapter hooks."""
        return list(self.pairs)

    def delta(self, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """s * B (A x) for module `path`, in the dtype of its output `y`."""
        A, B = self.pairs[path]
        return lora_branch(x.to(A.dtype), A, B, self.scale).to(y.dtype)


@dataclass
class NamedDeltas:
    """One named adapter: module path -> the function that gives what it adds to that module's output."""

    name: str
    deltas: dict[str, Delta]
    source: str = ""
    modules: list[nn.Module] = field(default_factory=list)  # kept alive (and movable) with the adapter

    @property
    def paths(self) -> list[str]:
        """The module paths this adapter hooks."""
        return list(self.deltas)

    def delta(self, path: str, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the output `y` of module `path` (given its input `x`)."""
        return self.deltas[path](x, y)


@dataclass
class NamedPrompt:
    """One named prompt-tuning adapter: its (n, d) virtual tokens; it hooks no module (`paths` is empty)."""

    name: str
    embeddings: torch.Tensor
    source: str = ""
    paths: list[str] = field(default_factory=list)


def frozen(params: dict[str, torch.Tensor]) -> None:
    """Named adapters serve inference: their parameters do not train."""
    for param in params.values():
        param.requires_grad_(False)
