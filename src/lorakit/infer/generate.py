"""Greedy generation for a batch of prompts (left padding, stop at end-of-sequence)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Complete each prompt greedily; return only the new text, special tokens removed.

    Prompts are left-padded so that every row's next token sits in the last column. Generation
    of a row stops at the tokenizer's end-of-sequence token or after `max_new_tokens`.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for chunk in _chunks(list(prompts), batch_size):
            encoded = tokenizer(list(chunk), return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **encoded, do_sample=False, max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]  # (B, new)
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
