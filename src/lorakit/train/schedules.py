"""Learning-rate schedules: a registry of decay shapes plus one linear warmup in front.

A schedule is a pure function of the step index, so its whole state is the global step: a
resumed run recomputes the same learning rate with no scheduler object to save.
"""
from __future__ import annotations

import math
from typing import Callable

# name -> factor(progress) for progress in [0, 1) through the post-warmup steps
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total_steps`.

    Warmup ramps (step + 1) / warmup_steps, so the first step already moves and step
    warmup_steps - 1 runs at the peak. After warmup the shape decays over the remaining steps
    without reaching zero on the last one (a step at lr 0 would be wasted).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return SCHEDULES[schedule]((step - warmup_steps) / decay_steps)
