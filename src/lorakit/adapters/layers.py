"""The LoRA layer: a drop-in module around a frozen linear layer, plus the supported layer types.

`LoRALayer` keeps the wrapped layer's parameters under their own names (`weight`, `bias`) and
adds `lora_A.weight` and `lora_B.weight` beside them, so an adapted model's state dict is the
base model's state dict plus adapter keys: base checkpoints still load strictly (torchtune's
approach). The wrapped module itself is kept off the module tree and handed back, holding the
current parameters, when the adapter is merged or unloaded.

Supported base layers live in `LAYER_KINDS` (exact type -> how to read it); another layer type
is one `register_layer_kind` call, not a new branch. A subclass of a supported type (Falcon's
`FalconLinear` overrides nn.Linear's forward with `x @ W.T + b`) is accepted when a probe shows
its forward equals its parent's math on the layer's own weights, because a LoRA layer computes
the base output with the parent's math; one that computes something else is refused.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.dropout import LoRADropout
from lorakit.adapters.lora_math import (InitMethod, delta_weight, init_lora_A_, init_lora_B_, lora_branch,
                                        merge_weight, scaling, unmerge_weight)
from lorakit.errors import AdapterError


@dataclass(frozen=True)
class LayerKind:
    """How to read one base layer type: weight layout and the plain forward pass."""

    fan_in_fan_out: bool  # weight stored (d_in, d_out) instead of nn.Linear's (d_out, d_in)
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, W, b) -> y

    def dims(self, weight: torch.Tensor) -> tuple[int, int]:
        """(d_in, d_out) of a weight stored in this layout (a 4-bit weight's shape before packing)."""
        quant_state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit: packed (n/2, 1) storage
        rows, cols = quant_state.shape if quant_state is not None else weight.shape
        return (rows, cols) if self.fan_in_fan_out else (cols, rows)


def _conv1d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """transformers' Conv1D: y = x W + b with W stored (d_in, d_out); same ops, so same numbers."""
    out_shape = x.shape[:-1] + (weight.shape[1],)
    x2d = x.reshape(-1, x.shape[-1])  # (N, d_in)
    y = torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return y.view(out_shape)  # (..., d_out)


LAYER_KINDS: dict[type, LayerKind] = {
    nn.Linear: LayerKind(fan_in_fan_out=False, forward=F.linear),
    Conv1D: LayerKind(fan_in_fan_out=True, forward=_conv1d_forward),
}


def register_layer_kind(layer_type: type, kind: LayerKind) -> None:
    """Teach LoRA another base layer type (matched by exact type, so subclasses must register too)."""
    LAYER_KINDS[layer_type] = kind


_subclass_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> LayerKind | None


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The LayerKind of `module`, or None when LoRA cannot wrap it.

    Registered types match exactly; a subclass of one matches only if `_same_math` proves its
    forward is its parent's (checked once per module).
    """
    kind = LAYER_KINDS.get(type(module))
    if kind is not None:
        return kind
    parent = next((cls for cls in type(module).__mro__[1:] if cls in LAYER_KINDS), None)
    if parent is None:
        return None
    if module not in _subclass_verdicts:
        _subclass_verdicts[module] = LAYER_KINDS[parent] if _same_math(module, LAYER_KINDS[parent]) else None
    return _subclass_verdicts[module]


def registered_parent(module: nn.Module) -> type | None:
    """The supported layer type that `module`'s class derives from, if any (for error messages)."""
    return next((cls for cls in type(module).__mro__ if cls in LAYER_KINDS), None)


@torch.no_grad()
def _same_math(module: nn.Module, kind: LayerKind) -> bool:
    """True when module(x) equals kind.forward(x, weight, bias) on random x, up to float rounding.

    The tolerance is the rounding of a length-d_in dot product in the weight's dtype (the two
    sides may sum in different orders); a different formula differs by far more.
    """
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.is_meta or not weight.is_floating_point():
        return False
    d_in = kind.dims(weight)[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, d_in, generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        expected = kind.forward(x, weight, bias).float()
        actual = module(x).float()
    except Exception:  # a forward that needs other inputs or another layout: not the parent's math
        return False
    if actual.shape != expected.shape:
        return False
    scale = expected.abs().max().item() + 1.0
    tolerance = 16 * torch.finfo(weight.dtype).eps * math.sqrt(d_in) * scale
    return bool((actual - expected).abs().max().item() <= tolerance)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """LoRA weights stay in float32 under a half-precision or quantised base (as peft does)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


class StandIn(nn.Module):
    """A module standing in for a base module that it keeps off the module tree (no duplicate
    state-dict keys); attributes it does not know are read from the base."""

    def hold(self, base: nn.Module) -> None:
        object.__setattr__(self, "_base", base)  # off the module tree

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base, name)  # e.g. Conv1D's nf / nx, an experts module's num_experts


class WrappedLayer(StandIn):
    """A layer standing in for a base linear layer (LoRA, DoRA, MoLE layers build on it).

    It holds the base layer's `weight` and `bias` under the same names, so base checkpoint keys
    load strictly into an adapted model; the base module itself is kept off the module tree (no
    duplicate state-dict keys) and answers attribute lookups the wrapper does not know.
    """

    def wrap(self, base: nn.Module, method: str) -> LayerKind:
        """Take over `base`'s weight and bias; `method` names the adapter in the error for other layers."""
        kind = layer_kind(base)
        if kind is None:
            raise AdapterError(f"{method} cannot wrap a module of type {type(base).__name__}; supported layer "
                               f"types: {', '.join(sorted(t.__name__ for t in LAYER_KINDS))}")
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.kind = kind
        self.hold(base)
        return kind

    @property
    def base_type(self) -> type:
        """The wrapped layer's class (nn.Linear, Conv1D, ...)."""
        return type(self._base)

    def to_plain(self) -> nn.Module:
        """The wrapped layer, holding this layer's current weight and bias; adapter weights are dropped."""
        base = self._base
        base.weight = self.weight
        base.bias = self.bias
        return base


class LoRALayer(WrappedLayer):
    """y = base(x) + s * B(A(dropout(x))), with the base layer's `weight` and `bias` kept by name."""

    def __init__(self, base: nn.Module, r: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, init: InitMethod = "kaiming") -> None:
        super().__init__()
        kind = self.wrap(base, "LoRA")
        d_in, d_out = kind.dims(base.weight)
        factory = dict(device=base.weight.device, dtype=adapter_dtype(base.weight.dtype))
        # Built as nn.Linear then re-initialised: the same random-number use as peft, so a seed
        # gives peft's A.
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)  # weight (r, d_in)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)  # weight (d_out, r)
        init_lora_A_(self.lora_A.weight, init)
        init_lora_B_(self.lora_B.weight)
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.in_features, self.out_features = d_in, d_out
        self.scaling = scaling(alpha, r, rslora)
        self.merged = False
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: the base layer alone
        self.train(base.training)  # a model in eval mode stays in eval mode (dropout off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.kind.forward(x, self.weight, self.bias)  # (..., d_out)
        if self.merged or not self.adapter_enabled:
            return result
        A, B = self.lora_A.weight, self.lora_B.weight
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast x themselves
            x = x if x.dtype == A.dtype else x.to(A.dtype)
        return (result + lora_branch(self.lora_dropout(x), A, B, self.scaling)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's layout."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.kind.fan_in_fan_out)

    def merged_weight(self) -> torch.Tensor:
        """W + s * B A as a new tensor; the layer is unchanged."""
        return merge_weight(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                            self.kind.fan_in_fan_out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s * B A into the base weight (in place); the branch is skipped until `unmerge`."""
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s * B A from the base weight again (exact up to float rounding)."""
        if self.merged:
            self.weight.copy_(unmerge_weight(self.weight, self.lora_A.weight, self.lora_B.weight,
                                             self.scaling, self.kind.fan_in_fan_out))
            self.merged = False

    def replace_base(self, base: nn.Module) -> None:
        """Wrap `base` instead of the current base layer (same sizes), e.g. a dequantised copy of it."""
        kind = layer_kind(base)
        if kind is None or kind.dims(base.weight) != (self.in_features, self.out_features):
            raise AdapterError(f"cannot rebase a LoRA layer ({self.in_features} -> {self.out_features}) onto "
                               f"{type(base).__name__}")
        self.wrap(base, "LoRA")

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out" if self.kind.fan_in_fan_out else ""
        return (f"base={self.base_type.__name__}({self.in_features}, {self.out_features}), r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g}{fifo}, merged={self.merged}")
