"""lab/intruders.py on handmade matrices: the random baseline keeps the update's spectrum, and the causal test
scales exactly the intruder directions."""
from __future__ import annotations

import torch

from _tol import tol
from lorakit.lab.intruders import random_like, scale_intruders


def test_random_update_has_the_same_singular_values():
    delta = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = random_like(delta, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.linalg.svdvals(noise), torch.linalg.svdvals(delta), **tol(torch.float64, 12))
    assert not torch.allclose(noise, delta)


def test_scale_intruders_scales_only_the_new_direction():
    base = torch.diag(torch.arange(1.0, 17.0, dtype=torch.float64))  # singular vectors: the standard basis
    spread = torch.ones(16, 1, dtype=torch.float64) / 4  # |cos| 1/4 with every basis vector: an intruder
    tuned = base + 40.0 * spread @ spread.T
    scaled = scale_intruders(base, tuned, scale=0.7)
    before, after = torch.linalg.svdvals(tuned), torch.linalg.svdvals(scaled)
    torch.testing.assert_close(after[0], 0.7 * before[0], **tol(torch.float64, 16))
    torch.testing.assert_close(after[1:], before[1:], **tol(torch.float64, 16))
    unchanged = base * 1.1  # the same directions: no intruder, the very same tensor back
    assert scale_intruders(base, unchanged) is unchanged
