"""Choosing the next token: small pure functions over a batch of logits, one row per sequence.

Order per step (as in transformers): repetition penalty on the raw logits, then temperature,
top-k, top-p; then argmax (greedy) or one draw from the softmax. Rows may use different settings
(a server batches requests with different options), so every function works row by row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorakit.schema import Config, setting


@dataclass(frozen=True)
class Sampling(Config):
    """Decoding options of one sequence."""

    section: ClassVar[str] = "sampling"

    temperature: float = setting(0.0, "0 means greedy (argmax); otherwise logits are divided by it before sampling.",
                                 ge=0)
    top_k: int = setting(0, "Keep only the k most likely tokens (0: off).", ge=0)
    top_p: float = setting(
        1.0, "Keep the smallest set of tokens whose probabilities sum to at least top_p (1.0: off).", gt=0, le=1)
    repetition_penalty: float = setting(
        1.0, "> 1 discourages tokens already in the sequence (CTRL, Keskar et al. 2019); 1.0: off.", gt=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens in `seen`: positive logits divided by `penalty`, negative ones multiplied.

    logits (V,), seen: token ids (any length, repeats allowed). Returns a new tensor.
    """
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[seen]
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (k=0 or k >= V: unchanged). logits (V,)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the most likely tokens until their mass reaches p.

    The most likely token is always kept. logits (V,).
    """
    if p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the better tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, seen: torch.Tensor, option: Sampling,
               generator: torch.Generator | None = None) -> int:
    """The next token id of one sequence from its logits (V,) and its tokens so far."""
    logits = repetition_penalty(logits.float(), seen, option.repetition_penalty)
    if option.greedy:
        return int(torch.argmax(logits))
    logits = top_p_filter(top_k_filter(logits / option.temperature, option.top_k), option.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
