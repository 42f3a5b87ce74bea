"""Scoring: exact-match and contains accuracy of generated answers, token loss of references.

Normalisation is deliberately light (trim, collapse inner whitespace, case-fold), so a score
counts the words a model produced and not its punctuation luck; nothing else is forgiven.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorakit.data.batching import collate_padded
from lorakit.labels import IGNORE_INDEX
# one comparison for evaluation and for the GRPO rewards (train/rewards.py), re-exported here
from lorakit.train.rewards import contains, exact_match, normalize
from lorakit.train.step import logits_of, model_inputs, token_loss_sum

__all__ = ["accuracy", "contains", "example_losses", "exact_match", "loss_summary", "normalize", "scored_ids",
           "token_loss"]


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fractions of rows scored right by exact match and by contains."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if n == 0:
        return {"exact_match": float("nan"), "contains": float("nan")}
    pairs = list(zip(predictions, references))
    return {"exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
            "contains": sum(contains(p, r) for p, r in pairs) / n}


def scored_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target + EOS, and aligned labels (-100 on the prompt)."""
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    target_ids = target_ids + [tokenizer.eos_token_id]
    if not prompt_ids:  # plain text: the first token has nothing to be predicted from
        return target_ids, [IGNORE_INDEX] + target_ids[1:]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


@torch.no_grad()
def token_loss(model, tokenizer, pairs: Sequence[tuple[str, str]], *,
               batch_size: int = 32) -> dict[str, float]:
    """Mean cross-entropy per target token (and its perplexity) over (prompt, target) pairs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(pairs), batch_size):
            encoded = [scored_ids(tokenizer, p, t) for p, t in pairs[start:start + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded])
            labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in encoded])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded])
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            targets = labels[:, 1:].to(device)                      # (B, T-1)
            total += token_loss_sum(logits[:, :-1], targets).item()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return loss_summary(total, count)


def loss_summary(total: float, count: int) -> dict[str, float]:
    """Mean loss per target token, its perplexity and the token count, from a loss sum over `count` tokens."""
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def example_losses(model, examples: Sequence[dict], pad_id: int, *,
                   batch_size: int = 32) -> list[tuple[float, int]]:
    """(summed cross-entropy, trained tokens) of each example (data.tokenize_rows' aligned input_ids/labels, and
    the items of a row with images): the training loss's terms, kept apart so any group of rows can be scored.
    Each chunk is the batch training makes of it (`collate_padded`: shifted labels, the items' values and
    positions) and goes through the model as `train_step` calls it."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[tuple[float, int]] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = {key: value.to(device) for key, value in collate_padded(examples[start:start + batch_size],
                                                                            pad_id).items()}
            logits = logits_of(model(**model_inputs(batch)))  # (B, T, V)
            targets = batch["labels"]  # (B, T): already the next token of each position
            for row in range(targets.shape[0]):
                loss = token_loss_sum(logits[row:row + 1], targets[row:row + 1]).item()
                sums.append((loss, int((targets[row] != IGNORE_INDEX).sum())))
    finally:
        model.train(was_training)
    return sums
