"""Dropout on the LoRA branch's input, with a cheaper random mask on the CPU.

`nn.Dropout` on a CPU spends most of its time drawing one random number per element: on a
1,024 x 576 bf16 input the mask costs several times the r=16 LoRA product it feeds, and under
torch.compile inductor's generated per-element RNG is slower still (measured in
benchmarks/RESULTS.md). Every adapted projection draws its own mask, so with p > 0 the mask
dominates a CPU LoRA step.

`LoRADropout` keeps nn.Dropout's meaning (each element kept independently, kept elements scaled
by 1 / (1 - p)) and its random stream (torch's default CPU generator, so seeds, checkpoints and
resume behave as before), but on the CPU it draws 64 random bits per four elements and compares
16-bit slices against a threshold. p is thereby rounded to a multiple of 1/65536 (0.05 becomes
0.0500030..., a difference of 3e-6), and the scale uses that rounded p, so the output's
expectation is exactly x. On other devices it is F.dropout.

The mask is a custom op: torch.compile keeps it as one opaque call per layer (no per-element
RNG in generated code). Each layer passes its own empty `owner` tensor, so compiled graphs never
merge two layers' masks where they see the same input tensor (q, k and v projections).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16  # the mask compares 16-bit uniform integers: p is rounded to a multiple of 1/65536


def drop_levels(p: float) -> int:
    """How many of the LEVELS 16-bit values drop an element, for a requested `p`."""
    return round(p * LEVELS)


def rounded_p(p: float) -> float:
    """The drop probability the CPU mask realises for a requested `p`."""
    return drop_levels(p) / LEVELS


@torch.library.custom_op("lorakit::dropout_keep_mask", mutates_args=(), device_types="cpu",
                         tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask(x: torch.Tensor, p: float, owner: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped like x: True where an element is kept, with probability 1 - rounded_p(p).

    `owner` is not read: it is the calling layer's own (empty) tensor, so that under
    torch.compile two layers' calls on the same input differ in an argument and are never
    merged into one mask (the nondeterministic tag alone does not stop that).
    """
    n = x.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (-(-n // 4),), dtype=torch.int64)
    uniform = words.view(torch.int16)[:n].view(x.shape)  # each uniform on [-32768, 32767]
    return uniform >= drop_levels(p) - LEVELS // 2


@keep_mask.register_fake
def _keep_mask_shape(x: torch.Tensor, p: float, owner: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bool)


def lora_dropout(x: torch.Tensor, p: float, owner: torch.Tensor, training: bool = True) -> torch.Tensor:
    """Dropout of x with probability p: the fast mask on the CPU, F.dropout elsewhere. `owner`:
    a tensor unique to the calling layer (see keep_mask)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return torch.where(keep_mask(x, p, owner), x * (1.0 / (1.0 - rounded_p(p))), 0.0)


class LoRADropout(nn.Dropout):
    """nn.Dropout for the LoRA branch (same `p`, same train/eval behaviour), with `lora_dropout`'s
    cheaper mask on the CPU. Its `owner` tensor is empty and not saved (persistent=False)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.register_buffer("owner", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_dropout(x, self.p, self.owner, self.training)
