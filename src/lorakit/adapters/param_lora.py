"""LoRA on parameters rather than layers: MoE experts stored as 3-D tensors (peft's `target_parameters`).

transformers 5 stores the experts of a mixture-of-experts block (Mixtral, Qwen3-MoE, ...) as one
module holding 3-D parameters, e.g. `experts.gate_up_proj` (E, 2 * d_ff, d) and
`experts.down_proj` (E, d, d_ff), each expert a (d_out, d_in) slice used as `F.linear(x, W[e])`.
There is no nn.Linear to wrap, so `all-linear` cannot reach them; `LoRA(target_parameters=[...])`
adapts the parameters themselves, one low-rank pair per expert:

    W'[e] = W[e] + s * B_e A_e,   A_e (r, d_in), B_e (d_out, r),   e = 0 .. E-1

stored as peft stores them, so the folder is peft's: lora_A (r * E, d_in) holds the A_e one after
the other, and lora_B (d_out, r * E) holds B_e interleaved (column k * E + e is column k of B_e).
A module with `is_transposed = True` stores (E, d_in, d_out) and gets the transposed delta. A 2-D
parameter is one expert (E = 1), W' = W + s * B A.

`ParamLoRA` stands in for the module that owns the parameters: it keeps that module's parameters,
buffers and children under their own names (base checkpoint keys still load strictly), holds the
module itself off the tree, and runs its forward with the adapted tensors swapped in
(`torch.func.functional_call`), so the module's own code, whatever expert kernel it picks, sees W'.
Dropout on the input of a parameter's product cannot be expressed, so `dropout` must be 0 (as in
peft).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from lorakit.adapters.layers import StandIn, adapter_dtype
from lorakit.adapters.lora_math import InitMethod, init_lora_A_, init_lora_B_, scaling
from lorakit.errors import AdapterError


def stores_transposed(owner: nn.Module) -> bool:
    """True when `owner` stores its expert weights (E, d_in, d_out) instead of (E, d_out, d_in)."""
    return bool(getattr(owner, "is_transposed", False))


def param_dims(owner: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, d_in, d_out) of parameter `name` of `owner`, read as peft reads it."""
    param = owner.get_parameter(name)
    if param.ndim == 2:
        return 1, param.shape[1], param.shape[0]
    experts, first, second = param.shape
    return (experts, first, second) if stores_transposed(owner) else (experts, second, first)


def param_delta(A: torch.Tensor, B: torch.Tensor, scale: float, shape: torch.Size, transposed: bool) -> torch.Tensor:
    """s * B_e A_e for every expert, shaped like the parameter (see the module docstring)."""
    experts = 1 if len(shape) == 2 else shape[0]
    rank = A.shape[0] // experts
    A3 = A.reshape(experts, rank, A.shape[1])  # (E, r, d_in)
    B3 = B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)  # (E, d_out, r)
    delta = (B3 @ A3) * scale  # (E, d_out, d_in)
    if transposed:  # the owner stores (E, d_in, d_out)
        delta = delta.transpose(1, 2)
    return delta.reshape(shape)


def find_param_targets(model: nn.Module, specs: Iterable[str]) -> dict[str, list[str]]:
    """Module path -> names of its parameters that `specs` select, in model and registration order.

    peft's rule: "<module path>.<parameter>" equals a spec or ends with "." + spec. Every spec must
    select something; each selected parameter must be 2-D or 3-D.
    """
    specs = list(specs)
    found: dict[str, list[str]] = {}
    hits = {spec: 0 for spec in specs}
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if type(module).__module__.startswith("lorakit."):
                continue  # an adapter's own weights (or a LoRA layer's base weight) are not targets
            key = f"{path}.{name}" if path else name
            chosen = [s for s in specs if key == s or key.endswith("." + s)]
            if not chosen:
                continue
            for spec in chosen:
                hits[spec] += 1
            if param.ndim not in (2, 3):
                raise AdapterError(f"target parameter {key!r} has {param.ndim} dimensions; LoRA on parameters "
                                   "takes 2-D weights or 3-D expert stacks")
            found.setdefault(path, []).append(name)
    for spec, count in hits.items():
        if not count:
            raise AdapterError(f"target_parameters entry {spec!r} matches no parameter of {type(model).__name__}; "
                               f"3-D parameters it has: {', '.join(_stacked(model)) or 'none'}")
    return found


def _stacked(model: nn.Module) -> list[str]:
    return sorted({name.rpartition(".")[2] for name, p in model.named_parameters() if p.ndim == 3})


def untargeted_experts(model: nn.Module) -> list[str]:
    """Leaf names of the model's frozen 3-D parameters (MoE experts) that no LoRA pair adapts."""
    adapted = {f"{path}.{name}" for path, module in param_lora_modules(model) for name in module.names}
    return sorted({name.rpartition(".")[2] for name, p in model.named_parameters()
                   if p.ndim == 3 and not p.requires_grad and name not in adapted})


def experts_note(model: nn.Module) -> str | None:
    """A line for a run whose MoE experts stay frozen because nothing targets them, else None."""
    names = untargeted_experts(model)
    if not names:
        return None
    return (f"note: the MoE experts ({', '.join(names)}: 3-D parameters) are frozen, because LoRA targets "
            f"modules and experts are not modules; add method.target_parameters: {names} to adapt them")


class ParamLoRA(StandIn):
    """The module owning targeted parameters, with one LoRA pair per targeted parameter."""

    def __init__(self, base: nn.Module, names: list[str], r: int, alpha: float, *, rslora: bool = False,
                 init: InitMethod = "kaiming") -> None:
        super().__init__()
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in base.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in base._non_persistent_buffers_set)
        for name, child in base.named_children():
            self.add_module(name, child)
        self.hold(base)
        self.transposed = stores_transposed(base)
        self.names, self.r, self.alpha, self.rslora = list(names), r, alpha, rslora
        self.scaling = scaling(alpha, r, rslora)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        for name in self.names:  # peft's order of random-number use: A, B, then A's init
            param = base.get_parameter(name)
            experts, d_in, d_out = param_dims(base, name)
            if r > min(d_in, d_out):
                raise AdapterError(f"rank r={r} is larger than min(d_in, d_out) = {min(d_in, d_out)} of parameter "
                                   f"{name!r} ({tuple(param.shape)}); use r <= {min(d_in, d_out)}")
            factory = dict(device=param.device, dtype=adapter_dtype(param.dtype))
            self.lora_A[name] = nn.Linear(d_in, r * experts, bias=False, **factory)  # weight (r*E, d_in)
            self.lora_B[name] = nn.Linear(r * experts, d_out, bias=False, **factory)  # weight (d_out, r*E)
            init_lora_A_(self.lora_A[name].weight, init)
            init_lora_B_(self.lora_B[name].weight)
        self.merged = False
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: the owner's own forward
        self.train(base.training)

    def delta(self, name: str) -> torch.Tensor:
        """s * B A of parameter `name`, shaped like it, in the adapter's dtype."""
        weight = getattr(self, name)
        return param_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling, weight.shape,
                           self.transposed)

    def adapted(self, name: str) -> torch.Tensor:
        """W + s * B A for parameter `name`, in W's dtype."""
        weight = getattr(self, name)
        return weight + self.delta(name).to(weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or not self.adapter_enabled:
            return self._base(*args, **kwargs)
        swapped = {name: self.adapted(name) for name in self.names}
        return torch.func.functional_call(self._base, swapped, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every delta into its parameter (in place); the pairs are skipped until `unmerge`."""
        if not self.merged:
            for name in self.names:
                getattr(self, name).copy_(self.adapted(name))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the deltas again (exact up to float rounding)."""
        if self.merged:
            for name in self.names:
                weight = getattr(self, name)
                weight.copy_(weight - self.delta(name).to(weight.dtype))
            self.merged = False

    def to_plain(self) -> nn.Module:
        """The owning module, holding this module's current parameters; the LoRA pairs are dropped."""
        base = self._base
        for name, param in self.named_parameters(recurse=False):
            setattr(base, name, param)
        return base

    def extra_repr(self) -> str:
        return (f"base={type(self._base).__name__}, parameters={self.names}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")


def peft_keys(path: str, names: list[str]) -> dict[str, str]:
    """Parameter name -> its key stem in a peft file ("<path>" + ".base_layer" per outer wrapper).

    peft wraps a module's targeted parameters one inside the other in registration order, so the
    first is innermost and its keys carry one "base_layer." for each wrapper around it.
    """
    return {name: path + ".base_layer" * (len(names) - 1 - i) for i, name in enumerate(names)}


def param_lora_modules(model: nn.Module) -> list[tuple[str, ParamLoRA]]:
    """(path, module) for every ParamLoRA in the model, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ParamLoRA)]
