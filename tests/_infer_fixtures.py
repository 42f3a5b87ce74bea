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


def check_rows_decode_alone(model, rows: list, alone_model, prompts: list[list[int]], budgets: list[int]) -> None:
    """Greedy-decode `prompts` in one batch with per-row adapters `rows` (rows finish at their own budgets
    and leave the batch, cache and adapter rows); each row's tokens must equal `alone_model(name)`'s alone."""
    from lorakit.adapters.multi import adapter_rows, keep_rows
    from lorakit.decoding.decode import decode
    from lorakit.decoding.sampling import Sampling

    kept = []
    with adapter_rows(model, rows):
        mixed = decode(model, prompts, [Sampling()] * len(rows), max_new_tokens=budgets, stop_ids=set(), pad_id=0,
                       on_shrink=lambda k: (kept.append(list(k)), keep_rows(model, k)))
    assert kept and [len(m) for m in mixed] == budgets
    for row, name in enumerate(rows):
        alone = decode(alone_model(name).eval(), [prompts[row]], [Sampling()], max_new_tokens=[budgets[row]],
                       stop_ids=set(), pad_id=0)
        assert mixed[row] == alone[0]
