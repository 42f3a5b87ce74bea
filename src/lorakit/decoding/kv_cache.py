"""The KV cache decode() uses: transformers' DynamicCache with each plain layer's keys and values in buffers.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, copying the whole
cache of every layer at every step (quadratic in the output length, and a fresh multi-megabyte
allocation per layer per step). A `BufferedLayer` keeps them in buffers (B, H, capacity, D) that
grow by doubling and writes one column per step; attention reads views of the filled columns, so
the output is bitwise the same. It also takes a grouped prompt pass: rows prefilled in groups of
similar length (`length_groups`), each group's keys right-aligned in its rows, so the batch's
cache is what one left-padded prompt pass would have left, without computing the padding.
Layers of other kinds (sliding windows, recurrent states) stay transformers' own.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

try:  # transformers >= 4.56 keeps one cache object per layer; older versions: transformers' own cache only
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover
    DynamicCache, DynamicLayer = None, object


class BufferedLayer(DynamicLayer):
    """One attention layer's keys and values in buffers (B, H, capacity, D) that grow by doubling up to
    `limit` columns; `keys` / `values` are views of the filled columns (what transformers' layer holds).

    During a grouped prompt pass (`group` set to (rows, end)) each group's keys land in its rows,
    right-aligned at column `end`; the layer reports no past tokens, so each group attends to itself."""

    def __init__(self, batch: int, capacity: int, limit: int) -> None:
        super().__init__()
        self.batch, self.capacity, self.limit = batch, capacity, max(limit, capacity)
        self.length = 0
        self.group: tuple[torch.Tensor | slice, int] | None = None
        self.misfit = False  # a grouped prompt pass handed keys that do not fit its rows (then it is redone)
        self.key_buffer = self.value_buffer = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        heads = key_states.shape[1]
        self.key_buffer = key_states.new_zeros(self.batch, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_zeros(self.batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.group is not None:  # one group's prompt pass: (b, H, w, D) into its rows at [end - w, end)
            rows, end = self.group
            width = key_states.shape[-2]
            count = self.batch if isinstance(rows, slice) else len(rows)
            if width > end or key_states.shape[0] != count:  # e.g. a model that puts tokens in front
                self.misfit = True
            else:
                self.key_buffer[rows, :, end - width:end] = key_states
                self.value_buffer[rows, :, end - width:end] = value_states
            return key_states, value_states
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            self._grow(end)
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.filled(end)
        return self.keys, self.values

    def filled(self, length: int) -> None:
        """Mark the first `length` columns as the cache (after a grouped prompt pass, or a step)."""
        self.group, self.length = None, length
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def _grow(self, needed: int) -> None:
        size = min(max(needed, 2 * self.key_buffer.shape[2]), max(needed, self.limit))
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], size, old.shape[-1])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def get_seq_length(self) -> int:
        return self.length if self.group is None else 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            index = beam_idx.to(self.key_buffer.device)
            self.key_buffer, self.value_buffer = self.key_buffer[index], self.value_buffer[index]
            self.batch = len(index)
            self.filled(self.length)

    batch_select_indices = reorder_cache

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.keys = self.values = None
        self.length, self.group, self.misfit, self.is_initialized = 0, None, False, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self.filled(max(0, self.length + tokens_to_remove))


def preallocated_cache(model, batch: int, capacity: int, limit: int):
    """transformers' DynamicCache for `model` with each plain layer swapped for a `BufferedLayer`, and whether
    every layer is one (grouped prefill needs that); (None, False) where transformers has no such cache."""
    if DynamicCache is None or getattr(model, "config", None) is None:
        return None, False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config DynamicCache cannot read: the model makes its own cache
        return None, False
    if not cache.layers:
        return None, False
    swapped = 0
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = BufferedLayer(batch, capacity, limit)
            swapped += 1
    return (cache, swapped == len(cache.layers)) if swapped else (None, False)


GROUP_COST = 16  # a prompt pass's fixed cost in padded tokens (Python and kernel launches per forward)


def length_groups(lengths: Sequence[int], fixed_cost: int = GROUP_COST) -> list[list[int]]:
    """Rows grouped for the prompt pass, longest group first: contiguous runs of the rows sorted by length
    (longest first) that minimise padded tokens plus `fixed_cost` per group (dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of grouping the first j rows of `order`
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last group is order[i:j]; order[i] is its longest row
            cost = best[i] + (j - i) * lengths[order[i]] + fixed_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]
