"""Full fine-tuning: every parameter of the model trains; there is no adapter to save."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from lorakit.adapters.registry import register_method
from lorakit.adapters.state import AdapterState, attach_state, ensure_plain


@register_method
@dataclass
class Full:
    """Full fine-tuning: all weights train (the baseline every adapter method is compared with)."""

    name: ClassVar[str] = "full"

    def apply(self, model: nn.Module) -> nn.Module:
        """Make every parameter trainable; returns the model."""
        ensure_plain(model)
        model.requires_grad_(True)
        attach_state(model, AdapterState(method=self))
        return model
