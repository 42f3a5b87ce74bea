"""The decoding loop: a batch of token-id prompts, one forward per step with the KV cache.

Prompts are left-padded so every row's next token sits in the last column; position ids count
only real tokens, so a padded row computes what it would alone. Each row has its own sampling
options, token budget and random generator (seeded per row, so a row's text does not depend on
which other rows share its batch). Rows that finish leave the batch, so the rest run on.

Rows may ask for log-probabilities: log_softmax of the model's raw logits at each step (before the
repetition penalty, temperature and top-k/top-p), as OpenAI reports them; only those rows pay for
the log_softmax and top-k.

Five speed-ups (`Speedups`, all on by default; `PLAIN` turns them off) keep the plain loop's math,
so greedy ids agree with it and with transformers' `generate` (tests compare them token by token on
tiny Llama, GPT-2 and BLOOM models; benchmarks/infer_paths.py checks it on the benchmark model):

  preallocated cache  keys and values in buffers written one column per step (decoding/kv_cache.py)
                      instead of a `torch.cat` of the whole cache per layer per step; bitwise the same
  grouped prefill     prompts of similar length run their prompt pass together (`length_groups`) and
                      their keys land right-aligned in the shared cache, so the padding the longest
                      prompt would impose on the others is not computed; the same math, rounded as
                      each group's shapes round it
  lean LoRA           each LoRA layer runs its own ops from locals for the call (decoding/lora_fastpath.py),
                      without its per-call lookups and checks; bitwise the same
  merged LoRA         where `merge_pays`, the call computes with a copy of W + s*B*A per adapted layer
                      (fp32/fp64 bases; rounding differs from the branch at float32 level); the model
                      is never written to
  shared prompts      rows with the same prompt (GRPO's group of completions, n > 1) run its prompt pass once;
                      the other rows get copies of its cache rows; the math of the prompt alone

They apply where the model allows: a cache that is not one plain key/value pair per layer (sliding
windows, recurrent states, caches of older transformers) keeps transformers' own layers; models with
hooks around the whole forward (prompt tuning), per-row adapters (`adapter_rows`), or a forward
without position ids (its positions would move with the padding) prefill in one padded batch.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lorakit.decoding.kv_cache import length_groups, preallocated_cache
from lorakit.decoding.lora_fastpath import lean_lora, merge_pays
from lorakit.decoding.sampling import Sampling, next_token

OnToken = Callable[[int, int], "bool | None"]  # (row, token id) -> True ends that row


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the step's most likely tokens (raw-logit log_softmax)."""

    logprob: float  # of the chosen token
    top: list[tuple[int, float]]  # (token id, logprob) of the k most likely tokens, most likely first


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int], ks: Sequence[int]) -> list[TokenLogprobs]:
    """Per row of logits (R, V): log_softmax at the chosen token and the ks[row] most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    picked = logprobs.gather(1, torch.tensor(list(chosen), device=logits.device)[:, None])[:, 0].tolist()
    values, ids = torch.topk(logprobs, min(max(ks), logprobs.shape[-1]), dim=-1)  # sorted, most likely first
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprobs(picked[r], list(zip(ids[r][:k], values[r][:k]))) for r, k in enumerate(ks)]


def _forward_kwargs(model) -> tuple[str, bool, bool]:
    """(name of the KV-cache argument, whether forward takes position ids, whether it can compute
    the last position's logits only): transformers 5 renamed past_key_values to cache; BLOOM has
    no position ids (ALiBi reads the attention mask)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "position_ids" in params, "logits_to_keep" in params


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), rows padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def _forward(model, ids, mask, positions, cache, signature: tuple[str, bool, bool]):
    cache_name, use_positions, last_logits_only = signature
    kwargs = {"input_ids": ids, "attention_mask": mask, cache_name: cache, "use_cache": True}
    if use_positions:
        kwargs["position_ids"] = positions
    if last_logits_only:  # the prompt pass needs no (B, T, V) logits, only the next token's
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    return out.logits[:, -1, :], getattr(out, cache_name)  # (B, V)


def choose_tokens(logits: torch.Tensor, seen: list[list[int]], options: Sequence[Sampling],
                  generators: list, done: list[bool]) -> list[int]:
    """Next token per row from logits (B, V); plain greedy rows share one argmax, the rest go one by one."""
    plain = [o.greedy and o.repetition_penalty == 1.0 for o in options]
    best = logits.argmax(dim=-1).tolist() if any(plain) else [0] * len(options)
    rows_logits = logits.float().cpu() if not all(plain) else None
    return [best[row] if plain[row] or done[row] else
            next_token(rows_logits[row], torch.tensor(seen[row], dtype=torch.long), options[row], generators[row])
            for row in range(len(options))]


@dataclass(frozen=True)
class Speedups:
    """What `decode` may do beyond the plain loop (the module docstring); each keeps the plain loop's math.
    `merged_lora` merges only where `merge_pays`; `lean_lora(model, merge=True)` merges regardless."""

    preallocated_cache: bool = True  # keys/values in buffers grown by doubling, one column written per step
    grouped_prefill: bool = True  # prompts of similar length prefilled together, little of the prompt pass padding
    lean_lora: bool = True  # LoRA layers run their own ops from locals, without the per-call bookkeeping
    merged_lora: bool = True  # one LoRA adapter (fp32/fp64) folded into a per-call copy of each adapted weight
    shared_prompts: bool = True  # one prompt pass per distinct prompt, its cache rows copied to its repeats


PLAIN = Speedups(preallocated_cache=False, grouped_prefill=False, lean_lora=False, merged_lora=False,
                 shared_prompts=False)


def first_of_each(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """(the row of each distinct key's first occurrence, in order; for every row the position of its key among
    them): which rows' prompt passes run, and whose pass each row copies."""
    slots: dict[Hashable, int] = {}
    firsts: list[int] = []
    inverse = []
    for row, key in enumerate(keys):
        if key not in slots:
            slots[key] = len(firsts)
            firsts.append(row)
        inverse.append(slots[key])
    return firsts, inverse


def _one_forward_hooks(model) -> bool:
    """True when something around the whole forward sees the batch (prompt tuning's hooks, per-row adapters),
    so the prompt pass must see the batch as one."""
    bank = getattr(model, "lorakit_named_adapters", None)
    return bool(model._forward_pre_hooks or model._forward_hooks or (bank is not None and bank.plan))


def _grouped_prefill(model, prompts, pad_id, cache, signature, width: int, device) -> torch.Tensor | None:
    """Each length group's prompt pass into `cache` (every layer a BufferedLayer); the last position's logits
    (B, V) in row order, or None when the model did not use `cache` (then nothing was kept)."""
    logits = None
    for rows in length_groups([len(p) for p in prompts]):
        index = torch.tensor(rows, device=device) if len(rows) < len(prompts) else slice(None)
        for layer in cache.layers:
            layer.group = (index, width)
        ids, mask = left_pad([prompts[r] for r in rows], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        part, returned = _forward(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, signature)
        if returned is not cache or any(layer.misfit or not layer.is_initialized for layer in cache.layers):
            for layer in cache.layers:
                layer.reset()
            return None
        if logits is None:
            logits = part.new_empty(len(prompts), part.shape[-1])
        logits[index] = part
    for layer in cache.layers:
        layer.filled(width)
    return logits


@torch.no_grad()
def decode(model, prompts: Sequence[Sequence[int]], options: Sequence[Sampling], *,
           max_new_tokens: Sequence[int], stop_ids: set[int], pad_id: int, seeds: Sequence[int | None] = (),
           on_token: OnToken | None = None, on_shrink: Callable[[list[int]], None] | None = None,
           top_logprobs: Sequence[int | None] = (),
           on_logprobs: Callable[[int, TokenLogprobs], None] | None = None,
           speedups: Speedups = Speedups()) -> list[list[int]]:
    """New token ids for every prompt (stop tokens not included).

    A row ends at a token in `stop_ids`, after its `max_new_tokens`, or when `on_token(row, id)`
    returns True (the caller saw a stop string); `on_token` is called for every kept token as soon
    as it is chosen (streaming). For a row whose `top_logprobs[row]` is a number k (None: off),
    `on_logprobs(row, TokenLogprobs)` comes just before each of its `on_token` calls, with the k
    most likely tokens. Finished rows leave the batch and its KV cache; `on_shrink(kept)` then gets
    the batch positions that stay (so per-row state outside, such as adapter rows, can follow).
    `speedups` chooses the speed-ups of the module docstring (`PLAIN`: none).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if all(budget <= 0 for budget in max_new_tokens):
        return [[] for _ in prompts]
    merge = speedups.merged_lora and merge_pays(model, prompts, max_new_tokens)
    with lean_lora(model, merge) if speedups.lean_lora or merge else nullcontext():
        return _decode(model, prompts, options, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                       seeds=seeds, on_token=on_token, on_shrink=on_shrink, top_logprobs=top_logprobs,
                       on_logprobs=on_logprobs, speedups=speedups)


def _prefill(model, prompts, pad_id: int, signature, speedups: Speedups, budget: int, device):
    """The prompt pass: (next-token logits (B, V), cache, mask (B, W), positions (B, W))."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    width = ids.shape[1]
    cache, all_buffered = (preallocated_cache(model, len(prompts), width + min(budget, 256), width + budget)
                           if speedups.preallocated_cache else (None, False))
    if (cache is not None and all_buffered and speedups.grouped_prefill and len(set(map(len, prompts))) > 1
            and signature[1] and not _one_forward_hooks(model)):  # without position ids, padding moves positions
        logits = _grouped_prefill(model, prompts, pad_id, cache, signature, width, device)
        if logits is not None:
            return logits, cache, mask, positions
    logits, cache = _forward(model, ids, mask, positions, cache, signature)
    return logits, cache, mask, positions


def _decode(model, prompts, options, *, max_new_tokens, stop_ids, pad_id, seeds, on_token, on_shrink,
            top_logprobs, on_logprobs, speedups: Speedups) -> list[list[int]]:
    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(s) if s is not None else None
                  for s in (list(seeds) or [None] * len(prompts))]
    signature = _forward_kwargs(model)
    seen = [list(p) for p in prompts]
    ks = list(top_logprobs) if on_logprobs is not None and top_logprobs else [None] * len(prompts)
    new: list[list[int]] = [[] for _ in prompts]
    done = [budget <= 0 for budget in max_new_tokens]
    firsts, inverse = (first_of_each([tuple(p) for p in prompts])
                       if speedups.shared_prompts and not _one_forward_hooks(model)  # hooks may see per-row inputs
                       else (range(len(prompts)), None))  # (images, adapters) behind equal ids
    distinct = [prompts[row] for row in firsts]
    logits, cache, mask, positions = _prefill(model, distinct, pad_id, signature, speedups,
                                              max(max_new_tokens), device)
    if len(distinct) < len(prompts):  # each repeat gets its prompt's logits, mask, positions and cache rows
        index = torch.tensor(inverse, device=device)
        logits, mask, positions = logits[index], mask[index], positions[index]
        cache.reorder_cache(index)
    live = list(range(len(prompts)))  # the original row of each batch row still being decoded
    while True:
        step = torch.full((len(live), 1), pad_id, dtype=torch.long)
        chosen = choose_tokens(logits, [seen[r] for r in live], [options[r] for r in live],
                               [generators[r] for r in live], [False] * len(live))
        asked = [i for i, row in enumerate(live) if ks[row] is not None]
        stats = dict(zip(asked, token_logprobs(logits[asked], [chosen[i] for i in asked],
                                               [ks[live[i]] for i in asked]))) if asked else {}
        for i, row in enumerate(live):
            token = step[i, 0] = chosen[i]
            if token in stop_ids:
                done[row] = True
                continue
            new[row].append(token)
            seen[row].append(token)
            if i in stats:
                on_logprobs(row, stats[i])
            ended = on_token(row, token) if on_token is not None else None
            done[row] = bool(ended) or len(new[row]) >= max_new_tokens[row]
        keep = [i for i, row in enumerate(live) if not done[row]]
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch (and the KV cache)
            index = torch.tensor(keep, device=device)
            step, mask, positions = step[keep], mask[index], positions[index]
            cache.reorder_cache(index)
            live = [live[i] for i in keep]
            if on_shrink is not None:
                on_shrink(keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = _forward(model, step.to(device), mask, positions, cache, signature)
    return new
