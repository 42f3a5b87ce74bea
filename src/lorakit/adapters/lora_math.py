"""The LoRA math, written once: scaling, the low-rank branch, delta weights, merge, init.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a weight W (d_out x d_in) and learns
A (r x d_in) and B (d_out x r), so the adapted layer computes

    h = W x + s * B (A x),      i.e.  W' = W + s * B A,

with s = alpha / r, or s = alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).
B starts at zero, so the adapted model starts exactly equal to the base model. The layer,
merging and the tests all call these functions.

`fan_in_fan_out=True` means the base weight is stored transposed, (d_in x d_out), as in
transformers' Conv1D (GPT-2 family); the delta is transposed to match.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

InitMethod = Literal["kaiming", "gaussian"]


def scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor s on the low-rank branch: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable numbers in one LoRA pair: A is (r x d_in), B is (d_out x r), so r * (d_in + d_out)."""
    return r * (d_in + d_out)


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s * B (A x) for a batch of row vectors: x (..., d_in) -> (..., d_out), never forming B A."""
    return F.linear(F.linear(x, A), B) * scale  # (..., r) -> (..., d_out)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """s * B A, shaped like the base weight: (d_out, d_in), or (d_in, d_out) when fan_in_fan_out."""
    delta = (B @ A) * scale  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
    return delta.T if fan_in_fan_out else delta


def merge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                 fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + s * B A as a new tensor in W's dtype (the delta is computed in the adapter's dtype)."""
    return W + delta_weight(A, B, scale, fan_in_fan_out).to(W.dtype)


def unmerge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                   fan_in_fan_out: bool = False) -> torch.Tensor:
    """W - s * B A: the inverse of `merge_weight` up to float rounding."""
    return W - delta_weight(A, B, scale, fan_in_fan_out).to(W.dtype)


@torch.no_grad()
def init_lora_A_(A: torch.Tensor, method: InitMethod = "kaiming") -> torch.Tensor:
    """Initialise A (r x d_in) in place and return it.

    "kaiming": Kaiming-uniform with a = sqrt(5), the nn.Linear default that the LoRA reference
    code and peft use; entries are uniform in [-1/sqrt(d_in), 1/sqrt(d_in)].
    "gaussian": normal with std 1/r, peft's `init_lora_weights="gaussian"`.
    """
    if method == "kaiming":
        return torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if method == "gaussian":
        return torch.nn.init.normal_(A, std=1.0 / A.shape[0])
    raise ValueError(f"unknown LoRA init {method!r}; expected 'kaiming' or 'gaussian'")


@torch.no_grad()
def init_lora_B_(B: torch.Tensor) -> torch.Tensor:
    """Zero B (d_out x r) in place, so s * B A = 0 and the adapted layer starts equal to the base."""
    return B.zero_()
