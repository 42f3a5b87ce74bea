"""Numeric precision modes: how weights are stored and which dtype the matmuls run in.

Trainable weights are always kept in fp32 (the optimizer's master copy): AdamW updates of
size lr * 1e-3 vanish in bf16's 8-bit mantissa. The modes differ in what the frozen base
weights are stored in and whether the forward pass runs under bf16 autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

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


PRECISIONS: dict[str, Precision] = {  # one entry per name in train.config.PRECISION_MODES
    "fp32": Precision(frozen_dtype=None, autocast_dtype=None),
    "bf16-autocast": Precision(frozen_dtype=None, autocast_dtype=torch.bfloat16),
    "bf16": Precision(frozen_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16),
}
