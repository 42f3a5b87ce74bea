"""Examples -> batches of tensors, padded or packed, with labels already shifted.

Shifted labels: labels[b, t] is the target of the prediction made at position t, i.e. the
next token of the same example, or IGNORE_INDEX. The last position of every example gets
IGNORE_INDEX, so no target crosses an example boundary, and the loss is simply
cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100).

Padded batch:  input_ids (B, T), labels (B, T), attention_mask (B, T) of 1/0, right padding.
Packed batch:  input_ids (B, T), labels (B, T), position_ids (B, T) restarting at 0 for each
               example, attention_mask (B, 1, T, T) float additive block-diagonal causal mask.

Examples with items (images: data/media.py) add, per modality, `{name}_values` (B, K, *shape) uint8 and
`{name}_positions` (B, K), where each item's soft tokens start (-1: none); only padded batches carry them.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Callable, overload

import torch

from lorakit.data.tokenize import Example
from lorakit.errors import DataError
from lorakit.labels import IGNORE_INDEX
from lorakit.media import positions_key, values_key


def pack_lengths(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit packing: indices of `lengths` grouped into rows of total length <= max_length.

    Examples are placed in the given order, each into the open row with the least space that
    still fits it (or a new row). Deterministic; O(n log n) apart from list inserts.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for j, n in enumerate(lengths):
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            rows.append([])
            space, r = max_length, len(rows) - 1
        rows[r].append(j)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack_balanced(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of `lengths` in as few rows as `pack_lengths` needs, spread so the longest row (the width every
    row of a batch is padded to) is as short as longest-first placement makes it; `pack_lengths`' rows when
    that is no shorter. Indices within a row keep their given order. Deterministic.
    """
    fitted = pack_lengths(lengths, max_length)
    if len(fitted) == 1:
        return fitted
    loads, rows = [0] * len(fitted), [[] for _ in fitted]
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):  # longest first, to the emptiest row
        r = min(range(len(rows)), key=lambda r: (loads[r], r))
        rows[r].append(j)
        loads[r] += lengths[j]
    if max(loads) > max_length or max(loads) >= max(sum(lengths[j] for j in row) for row in fitted):
        return fitted
    return [sorted(row) for row in rows]


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive float mask: 0 where t may attend to s.

    t attends to s when both belong to the same segment and s <= t.
    """
    width = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    blocked = ~(same & causal)
    mask = torch.zeros(blocked.shape, dtype=torch.float32)
    return mask.masked_fill(blocked, torch.finfo(torch.float32).min)[:, None]  # (B, 1, T, T)


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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **collate_media(examples)}


def collate_media(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Per modality the examples' items (B, K, *shape) uint8 and where each starts (B, K), -1 past a row's items."""
    found: dict[str, list[list[tuple[int, object]]]] = {}
    for b, ex in enumerate(examples):
        for modality, start, values in ex.get("media", ()):
            found.setdefault(modality, [[] for _ in examples])[b].append((start, values))
    batch = {}
    for modality, rows in found.items():
        width = max(len(row) for row in rows)
        shape = torch.as_tensor(next(v for row in rows for _, v in row)).shape
        values = torch.zeros((len(rows), width, *shape), dtype=torch.uint8)  # (B, K, *shape)
        positions = torch.full((len(rows), width), -1, dtype=torch.long)  # (B, K)
        for b, row in enumerate(rows):
            for k, (start, item) in enumerate(row):
                values[b, k], positions[b, k] = torch.as_tensor(item), start
        batch[values_key(modality)], batch[positions_key(modality)] = values, positions
    return batch


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several whole examples per row, each in its own causal block; rows padded to the longest.

    Padding positions form one-token blocks of their own (so no attention row is empty). Examples with items
    (images) are refused: their rows are laid out padded (run.py says so).
    """
    if any("media" in ex for row in rows for ex in row):
        raise DataError("examples with images cannot be packed: their soft tokens go in through the model's input "
                        "embeddings row by row; set data.packing false")
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


class LazyBatches(Sequence):
    """An epoch's batches as a read-only list whose items are collated when read.

    Only the grouping of examples is kept; a batch's tensors (for packed rows, a B*T*T float
    mask) exist while the caller holds them, so an epoch costs memory for one batch, not all.
    Reading the same index twice builds equal tensors again.
    """

    def __init__(self, groups: list[list], collate: Callable[[list], dict[str, torch.Tensor]],
                 row_length: Callable[[object], int]) -> None:
        self._groups = groups  # per batch: the examples (padded) or rows of examples (packed)
        self._collate = collate
        self._row_length = row_length  # real tokens in one row of a group

    def row_lengths(self) -> list[list[int]]:
        """Per batch, the real tokens of each row (without collating anything)."""
        return [[self._row_length(row) for row in group] for group in self._groups]

    def __len__(self) -> int:
        return len(self._groups)

    @overload
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, torch.Tensor]]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._collate(group) for group in self._groups[index]]
        return self._collate(self._groups[index])

    def __repr__(self) -> str:
        return f"LazyBatches({len(self)} batches)"


def make_batches(examples: list[Example], batch_size: int, *, pack: bool, max_length: int,
                 pad_id: int, seed: int, epoch: int, shuffle: bool = True) -> LazyBatches:
    """One epoch of batches (a list-like, collated on access); deterministic for a given (seed, epoch).

    Padded mode: batch_size examples per batch. Packed mode: examples (in epoch order) are
    packed best-fit into rows of at most max_length tokens, batch_size rows per batch; use
    `check_packing(model)` once to confirm the model honours the block-diagonal mask.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    _check_lengths(examples, max_length)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    if not pack:
        groups = [[examples[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
        return LazyBatches(groups, lambda group: collate_padded(group, pad_id),
                           lambda ex: len(ex["input_ids"]))
    bins = pack_lengths([len(examples[i]["input_ids"]) for i in order], max_length)
    rows = [[examples[order[j]] for j in row] for row in bins]
    return _packed([rows[k:k + batch_size] for k in range(0, len(rows), batch_size)], pad_id)


def pack_each_batch(examples: list[Example], batch_size: int, *, max_length: int, pad_id: int, seed: int,
                    epoch: int, shuffle: bool = True) -> LazyBatches:
    """The micro-batches of `make_batches(..., pack=False)`, each laid out as packed rows (as few rows of at
    most `max_length` tokens as fit it, balanced so little is padded: `pack_balanced`) instead of padded
    ones: what data.packing auto trains on.

    Each micro-batch holds the same examples as unpacked, so a step's loss (summed over the same trained
    tokens, normalised by their count) is the unpacked step's up to rounding, and a run keeps its number of
    steps; only padding goes. `make_batches(pack=True)` packs the whole epoch instead: fewer, fuller
    micro-batches (micro_batch_size then counts rows), a different run.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    _check_lengths(examples, max_length)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    groups = []
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start:start + batch_size]]
        groups.append([[batch[j] for j in row] for row in pack_balanced([len(ex["input_ids"]) for ex in batch],
                                                                         max_length)])
    return _packed(groups, pad_id)


def _packed(groups: list[list[list[Example]]], pad_id: int) -> LazyBatches:
    """Batches of packed rows of examples, collated on access."""
    return LazyBatches(groups, lambda group: collate_packed(group, pad_id),
                       lambda row: sum(len(ex["input_ids"]) for ex in row))


def packing_efficiency(batches: LazyBatches) -> float:
    """Share of computed positions that hold a real token (not padding), over an epoch's batches."""
    real = computed = 0
    for row_lengths in batches.row_lengths():
        real += sum(row_lengths)
        computed += len(row_lengths) * max(row_lengths)  # rows are padded to the batch's longest
    return real / max(1, computed)
