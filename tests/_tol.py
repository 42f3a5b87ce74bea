"""Tolerances for comparing two computations of one value that round differently (STYLE.md point 15).

Two kernels, batch shapes, thread counts or CPU instruction sets (AVX-512, AVX2, plain) add the
same numbers in different orders. Each addition rounds by up to u = eps / 2 of the dtype (fp32
2^-24 = 6e-8, bf16 2^-8 = 3.9e-3), so two orderings of a K-term sum differ by about u * sqrt(K)
of the sum's size (independent rounding errors add up like a random walk), u * K at worst. bf16
kernels on CPU accumulate in fp32 and round each output once, so for bf16 K = 1. A model chains a
dozen such sums (projections, attention, MLP, norms; forward and backward) and a result can cancel
below its terms' size; SAFETY = 16 covers both. The bound:

    rtol = SAFETY * u * sqrt(K) * (1 + S),    atol = rtol * scale

K: the longest reduction on the path (MLP width, vocabulary, tokens summed into a loss or a
gradient; TINY for the tiny test models). S: optimizer steps a difference passes through (each
step starts from the last one's gap and adds its own). scale: the compared values' typical size
(1 for logits, losses, gradients; a merged weight's size for merge/unmerge round trips); for
weights after training, the distance they moved, lr * S (an Adam step is about lr whatever the
gradient's size, so a gradient's rounding moves a weight in proportion to lr).

fp32 on the tiny models this gives 1e-6 .. 1e-4; a bug (a missing scaling factor, a leak between
packed examples, a dropped token) moves results by more than 1e-3, so each bound still catches it.
Exact comparisons (torch.equal) stay where both sides run the same arithmetic: save/load round
trips, the same kernel on the same inputs, a zero-initialised adapter, a resumed run.
"""
from __future__ import annotations

import math

import pytest
import torch

SAFETY = 16
TINY = 128  # the tiny test models' longest sum: MLP width or vocabulary 128, about 100 tokens per batch


def tol(dtype: torch.dtype = torch.float32, reduction: int = 1, steps: int = 0, scale: float = 1.0) -> dict:
    """{"rtol", "atol"} for torch.testing.assert_close (see the module docstring for the rule)."""
    rtol = SAFETY * torch.finfo(dtype).eps / 2 * math.sqrt(reduction) * (1 + steps)
    return {"rtol": rtol, "atol": rtol * scale}


def approx(expected, dtype: torch.dtype = torch.float32, reduction: int = 1, steps: int = 0, scale: float = 1.0):
    """pytest.approx with the same bound."""
    bound = tol(dtype, reduction, steps, scale)
    return pytest.approx(expected, rel=bound["rtol"], abs=bound["atol"])
