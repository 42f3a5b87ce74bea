"""Examples -> batches of tensors, padded or packed, with labels already shifted.

Shifted labels: labels[b, t] is the target of the prediction made at position t, i.e. the
next token of the same example, or IGNORE_INDEX. The last position of every example gets
IGNORE_INDEX, so no target crosses an example boundary, and the loss is simply
cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100).

Padded batch:  input_ids (B, T), labels (B, T), attention_mask (B, T) of 1/0, right padding.
Packed batch:  input_ids (B, T), labels (B, T), position_ids (B, T) restarting at 0 for each
               example, attention_mask (B, 1, T, T) float additive block-diagonal causal mask.
"""
from __future__ import annotations

import random
import torch

from lorakit.data.packing import block_causal_mask, pack_lengths
from lorakit.data.tokenize import IGNORE_INDEX, Example
from lorakit.errors import DataError


def shift_labels(labels: list[int]) -> list[int]:
    """Aligned labels -> next-token targets of one example: out[t] = labels[t + 1], last = -100."""
    return list(labels[1:]) + [IGNORE_INDEX]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of n examples in one epoch; the same (seed, epoch) always gives the same order."""
    order = list(range(n))
    if shuffle:
        random.Random(f"lorakit-epoch:{seed}:{epoch}").shuffle(order)
    return order


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest in the batch."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"])
        labels[b, :n] = torch.tensor(shift_labels(ex["labels"]))
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several whole examples per row, each in its own causal block; rows padded to the longest.

    Padding positions form one-token blocks of their own (so no attention row is empty).
    """
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    segment_ids = -torch.arange(1, width + 1).repeat(len(rows), 1)  # (B, T); padding: unique < 0
    for b, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row):
            n = len(ex["input_ids"])
            input_ids[b, start:start + n] = torch.tensor(ex["input_ids"])
            labels[b, start:start + n] = torch.tensor(shift_labels(ex["labels"]))
            position_ids[b, start:start + n] = torch.arange(n)
            segment_ids[b, start:start + n] = k
            start += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": block_causal_mask(segment_ids)}


def _check_lengths(examples: list[Example], max_length: int) -> None:
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n != len(ex["labels"]):
            raise DataError(f"example {i}: {n} input_ids but {len(ex['labels'])} labels")
        if n == 0 or n > max_length:
            raise DataError(f"example {i} has {n} tokens; examples must have 1 to max_length="
                            f"{max_length} tokens (tokenize_rows truncates them)")


def make_batches(examples: list[Example], batch_size: int, *, pack: bool, max_length: int,
                 pad_id: int, seed: int, epoch: int, shuffle: bool = True) -> list[dict[str, torch.Tensor]]:
    """One epoch of batches; deterministic for a given (seed, epoch).

    Padded mode: batch_size examples per batch. Packed mode: examples (in epoch order) are
    packed best-fit into rows of at most max_length tokens, batch_size rows per batch; use
    `check_packing(model)` once to confirm the model honours the block-diagonal mask.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    _check_lengths(examples, max_length)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    if not pack:
        return [collate_padded([examples[i] for i in order[k:k + batch_size]], pad_id)
                for k in range(0, len(order), batch_size)]
    bins = pack_lengths([len(examples[i]["input_ids"]) for i in order], max_length)
    rows = [[examples[order[j]] for j in row] for row in bins]
    return [collate_packed(rows[k:k + batch_size], pad_id) for k in range(0, len(rows), batch_size)]

