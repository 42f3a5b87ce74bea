"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

DoRA splits each adapted weight into a direction, trained with LoRA, and a magnitude m, one
trainable number per output unit:

    W' = m * (W + s B A) / ||W + s B A||

where the norm is taken per output unit (over the input dimension: row i of the (d_out, d_in)
weight, as peft does; the paper writes W as d_in x d_out and calls these columns). m starts at
||W||, and B at zero, so an adapted layer starts exactly equal to the base layer. Following the
paper's section 4.3 (and peft), the norm is treated as a constant in backward: it is computed
once per forward per layer under no_grad, so autograd stores no (d_out, d_in) intermediate.
The output is never built from W' itself; the layer computes

    y = (m / ||W + s B A||) * (W x + s B A x) + b,

which costs one extra (d_out x r) @ (r x d_in) product and a row norm per forward over LoRA.
Nothing is cached across steps: A and B change every step, so the norm does too.

Adapters save in PEFT format (`use_dora: true`, m under `<module>.lora_magnitude_vector`); apply,
save, load, merge, unload and count are LoRA's (lora.py, with `DoRALayer` as the layer), so the
config names lora.py as its implementation. As a named adapter (per-row batches, adapters/multi.py)
W, A, B and m are fixed, so each module's factor g = m / ||W + s B A|| is computed once at load
(`frozen_factors`) and a row's output is g * (LoRA output) + (1 - g) * b (`rescale`).
"""
from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.config import DoRA
from lorakit.adapters.layers import LoRALayer, layer_kind
from lorakit.adapters.lora_math import InitMethod, delta_weight, lora_branch
from lorakit.errors import AdapterError

__all__ = ["DoRA", "DoRALayer", "dora_param_count", "frozen_factors", "rescale", "weight_norm"]


# -- the math ---------------------------------------------------------------------------------

def dora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable numbers in one DoRA layer: LoRA's r * (d_in + d_out) plus d_out magnitudes."""
    return r * (d_in + d_out) + d_out


def weight_norm(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """||W + delta|| per output unit, shape (d_out,), in delta's dtype.

    Both tensors are in the base weight's layout: (d_out, d_in), or (d_in, d_out) when fan_in_fan_out.
    """
    combined = weight.to(delta.dtype) + delta  # same layout as the base weight
    return torch.linalg.vector_norm(combined, dim=0 if fan_in_fan_out else 1)  # (d_out,)


def dora_output(base_out: torch.Tensor, lora_out: torch.Tensor, magnitude: torch.Tensor,
                norm: torch.Tensor) -> torch.Tensor:
    """(m / norm) * (W x + s B A x): the DoRA output before the bias. base_out, lora_out: (..., d_out)."""
    return (magnitude / norm) * (base_out + lora_out)  # (d_out,) broadcasts over (..., d_out)


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                       fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', m / ||W + delta||): the merged weight in W's layout and dtype, and the per-unit scale used."""
    scale = magnitude / weight_norm(weight, delta, fan_in_fan_out)  # (d_out,)
    combined = weight.to(delta.dtype) + delta
    merged = combined * (scale if fan_in_fan_out else scale[:, None])
    return merged.to(weight.dtype), scale


def dora_unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor,
                         fan_in_fan_out: bool = False) -> torch.Tensor:
    """The base weight back from a merged one: W'/scale - delta (exact up to float rounding)."""
    combined = merged.to(delta.dtype) / (scale if fan_in_fan_out else scale[:, None])
    return (combined - delta).to(merged.dtype)


# -- the layer --------------------------------------------------------------------------------

class DoRALayer(LoRALayer):
    """A LoRA layer with a trainable magnitude m (d_out,), the `lora_magnitude_vector`."""

    def __init__(self, base: nn.Module, r: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, init: InitMethod = "kaiming") -> None:
        if getattr(base.weight, "quant_state", None) is not None:
            raise AdapterError(f"DoRA needs the full base weight for its norm; {type(base).__name__} stores it "
                               "quantised; use DoRA on an unquantised model, or method 'qlora'")
        super().__init__(base, r, alpha, rslora=rslora, dropout=dropout, init=init)
        with torch.no_grad():  # B = 0, so this is ||W||
            start = self.weight_norm()
        self.lora_magnitude_vector = nn.Parameter(start)  # (d_out,), adapter dtype
        self._merge_scale: torch.Tensor | None = None

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output unit (d_out,), a constant for autograd (paper section 4.3)."""
        return weight_norm(self.weight, self.delta_weight(), self.kind.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.kind.forward(x, self.weight, self.bias)
        A, B, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        norm = self.weight_norm()  # once per forward
        x_lora = self.lora_dropout(x if x.dtype == A.dtype else x.to(A.dtype))
        lora_out = lora_branch(x_lora, A, B, self.scaling)  # (..., d_out)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # peft's form under dropout: the undropped base output plus the DoRA correction on dropped x
            base_out = self.kind.forward(x, self.weight, self.bias)
            dropped = self.kind.forward(x_lora.to(self.weight.dtype), self.weight, None).to(A.dtype)
            return (base_out + (m / norm - 1) * dropped + (m / norm) * lora_out).to(base_out.dtype)
        base_out = self.kind.forward(x, self.weight, None)  # W x, (..., d_out)
        out = dora_output(base_out.to(A.dtype), lora_out, m, norm)
        if self.bias is not None:
            out = out + self.bias
        return out.to(base_out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """m * (W + s B A) / ||W + s B A|| as a new tensor; the layer is unchanged."""
        return dora_merged_weight(self.weight, self.delta_weight(), self.lora_magnitude_vector.detach(),
                                  self.kind.fan_in_fan_out)[0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the DoRA weight into the base weight; the scale is kept so `unmerge` can undo it."""
        if not self.merged:
            merged, self._merge_scale = dora_merged_weight(self.weight, self.delta_weight(),
                                                           self.lora_magnitude_vector, self.kind.fan_in_fan_out)
            self.weight.copy_(merged)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Recover the base weight from the merged one (exact up to float rounding)."""
        if self.merged:
            self.weight.copy_(dora_unmerged_weight(self.weight, self.delta_weight(), self._merge_scale,
                                                   self.kind.fan_in_fan_out))
            self.merged, self._merge_scale = False, None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


# -- as a named adapter (inference: everything fixed) -----------------------------------------

def frozen_factors(module: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float,
                   magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, (1 - g) * bias) of one DoRA module: g = m / ||W + s B A|| per output unit (d_out,), frozen."""
    kind = layer_kind(module)
    norm = weight_norm(module.weight, delta_weight(A, B, scale, kind.fan_in_fan_out), kind.fan_in_fan_out)
    g = magnitude.to(A.dtype) / norm  # (d_out,)
    bias = module.bias if module.bias is not None else torch.zeros_like(g)
    return g, (1 - g) * bias.detach().to(g.dtype)


def rescale(out: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """DoRA's output from LoRA's: g * (W x + s B A x) + b = g * (LoRA output) + (1 - g) * b; None: unchanged."""
    if factors is None:
        return out
    g, c = factors
    return (g * out.to(g.dtype) + c).to(out.dtype)
