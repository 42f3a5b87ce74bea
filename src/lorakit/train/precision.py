"""Numeric precision modes: how weights are stored and which dtype the matmuls run in; fp16's loss scaling.

Trainable weights are always kept in fp32 (the optimizer's master copy): AdamW updates of
size lr * 1e-3 vanish in bf16's 8-bit mantissa. The modes differ in what the frozen base
weights are stored in and whether the forward pass runs under bf16 or fp16 autocast.

fp16 has bf16's 10-bit mantissa's worth of precision but only a 5-bit exponent: gradients below
about 6e-8 flush to zero and above 65504 overflow. The fp16 modes therefore scale the loss
(`LossScaler`, Micikevicius et al. 2018, arXiv:1710.03740, with torch.amp.GradScaler's dynamic
rule): the backward pass runs on loss x scale, the fp32 gradients are divided by the scale before
clipping, and a step whose gradients hold an inf or nan (on any rank) is skipped (no optimizer
update, no schedule advance) and halves the scale; `growth_interval` clean steps in a row double it.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    """One precision mode: the dtype of frozen floating weights (None = leave) and the autocast dtype."""

    frozen_dtype: torch.dtype | None
    autocast_dtype: torch.dtype | None

    def prepare(self, model: nn.Module) -> None:
        """Cast weights in place: trainable params to fp32, frozen floating params to `frozen_dtype`."""
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
            elif not param.requires_grad and self.frozen_dtype is not None and param.is_floating_point():
                param.data = param.data.to(self.frozen_dtype)

    def autocast(self, device: torch.device) -> ContextManager:
        """The context the forward pass runs in on `device`."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @property
    def scales_loss(self) -> bool:
        """Whether training in this mode needs a `LossScaler` (fp16's narrow exponent)."""
        return self.autocast_dtype == torch.float16


PRECISIONS: dict[str, Precision] = {  # one entry per name in train.config.PRECISION_MODES
    "fp32": Precision(frozen_dtype=None, autocast_dtype=None),
    "bf16-autocast": Precision(frozen_dtype=None, autocast_dtype=torch.bfloat16),
    "bf16": Precision(frozen_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16),
    "fp16-autocast": Precision(frozen_dtype=None, autocast_dtype=torch.float16),
    "fp16": Precision(frozen_dtype=torch.float16, autocast_dtype=torch.float16),
}


@dataclass
class LossScaler:
    """Dynamic loss scaling (the module docstring): `scale` the loss, `unscale` the gradients, `update` after the step.

    Defaults are torch.amp.GradScaler's. Its whole state is these plain numbers (`state_dict`), kept in a
    checkpoint's state.json so a resumed run scales exactly as the uninterrupted one.
    """

    scale: float = 2.0 ** 16  # a power of two: multiplying by it and dividing by it are exact
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000  # clean steps in a row before the scale grows
    clean_steps: int = 0  # clean steps since the last overflow or growth (GradScaler's growth tracker)
    skipped: int = 0  # optimizer steps skipped for inf/nan gradients so far in the run

    def unscale(self, params: Sequence[nn.Parameter],
                total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """Divide the gradients of `params` by the scale in place; whether all of them are finite.

        `total(tensor)` sums a count over the ranks (train/distributed.py `Parallel.total`), so every rank skips
        the same steps even when each holds a shard of the gradients (FSDP)."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        found = torch.zeros(1, device=grads[0].device if grads else "cpu")  # > 0 when any element is inf or nan
        for group in _by_device_and_dtype(grads):
            flag = torch.zeros(1, device=group[0].device)  # the kernel sets it to 1 on an inf or nan
            inverse = torch.full((1,), 1.0 / self.scale, device=group[0].device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inverse)  # GradScaler's own kernel
            found += flag.to(found.device)
        if total is not None:
            found = total(found)
        return not bool(found.item())  # the step's one host sync: whether to step is decided on the host

    def update(self, finite: bool) -> None:
        """After a step: an overflow halves the scale (and counts a skipped step); `growth_interval` clean steps in a
        row double it."""
        if not finite:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The scaler as JSON-able numbers."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` gave."""
        for key, value in state.items():
            setattr(self, key, value)


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of a DTensor (FSDP2), else the gradient itself."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` grouped by device and dtype (the unscale kernel takes one of each at a time)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())
