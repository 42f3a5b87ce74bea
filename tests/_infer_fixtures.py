"""Tiny adapters for the inference tests: LoRA with random (non-zero) B, saved in PEFT format."""
from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.adapters import LoRA


def random_adapter(build, folder: Path, seed: int, *, r: int = 4, targets="all-linear", method=LoRA) -> Path:
    """apply LoRA (or DoRA) to a fresh `build()` model, give every B (and DoRA magnitude) random values,
    save to `folder`."""
    torch.manual_seed(seed)
    model = lorakit.apply(build(), method(r=r, alpha=2 * r, targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "magnitude" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    lorakit.save_adapter(model, folder, base_model_name_or_path="tiny")
    return folder
