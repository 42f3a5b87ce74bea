"""The shared-prompt layout of preference pairs: one row per pair, the prompt once, both answers after it.

A pair's two sides begin with the same P prompt ids (data/preference.py). Padded pairs compute that prompt
twice; here it is computed once. Each pair is one row, a tree of three parts:

    shared  the prompt's first P-1 tokens                       positions 0 .. P-2
    chosen  the prompt's last token, then the chosen answer      positions P-1 .. P-1+Rc
    rejected  the prompt's last token, then the rejected answer  positions P-1 .. P-1+Rr (restarting)

with a tree-shaped causal mask: the shared part attends to itself causally, each branch to the shared part
and causally to itself, never to the other branch (padding: one-token blocks of their own). The prompt's
last token opens each branch because its logit predicts the answer's first token, which differs between
the sides. Every answer token then sees exactly the tokens and positions it sees in its padded row, so
its logits are the padded layout's up to rounding, on a model that honours a 4D float mask and
position_ids; `shared_prompt_problem` proves that on the model in hand (as the packing leak probe does,
inside `packed_forward`, so BLOOM's ALiBi is built per token from the mask) or says why not. A preference
run lays its pairs out this way where the probe passes (data.packing auto or true; lorakit/run.py).

A batch of B pairs: input_ids, position_ids (B, T), attention_mask (B, 1, T, T) additive float,
labels (2B, T) shifted as the padded layout's (rows 0..B-1 the chosen targets, B..2B-1 the rejected ones,
each at the positions of row b % B where that side's tokens are) and "pairs": B. A row's log-prob is the
padded layout's: the token log-probs of logits (B, T, V) repeated twice, (2B, T, V), against labels.
"""
from __future__ import annotations

from typing import Any

import torch

from lorakit.data.batching import LazyBatches, epoch_order, shift_labels
from lorakit.data.packing import PackingProblem, packed_forward, sliding_window
from lorakit.data.preference import Pair, _check_pairs, collate_pairs
from lorakit.errors import DataError
from lorakit.labels import IGNORE_INDEX

SHARED, CHOSEN, REJECTED = 0, 1, 2  # segment ids of a row's parts; padding gets unique negative ids


def shared_length(pair: Pair) -> int:
    """Tokens of the prompt both branches attend to: all but its last (which opens each branch)."""
    return max(pair["prompt_length"] - 1, 0)


def row_length(pair: Pair) -> int:
    """Tokens of a pair's shared-prompt row."""
    return len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"]) - shared_length(pair)


def tree_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive float mask: 0 where t may attend to s.

    t attends to s <= t when both are in the same part, or s is in the shared prompt and t in a branch.
    """
    width = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = (query == key) | ((key == SHARED) & (query >= 0))  # (B, T, T)
    allowed &= torch.ones(width, width, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]  # (B, 1, T, T)


def collate_shared_prompt(pairs: list[Pair], pad_id: int) -> dict[str, Any]:
    """B pairs -> one batch of B shared-prompt rows (see the module docstring), right-padded with pad_id."""
    count, width = len(pairs), max(row_length(pair) for pair in pairs)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((count, width), dtype=torch.long)  # (B, T)
    labels = torch.full((2 * count, width), IGNORE_INDEX, dtype=torch.long)  # (2B, T)
    segment_ids = -torch.arange(1, width + 1).repeat(count, 1)  # (B, T); padding: unique < 0
    for b, pair in enumerate(pairs):
        shared = shared_length(pair)
        chosen, rejected = pair["chosen"], pair["rejected"]
        input_ids[b, :shared] = torch.tensor(chosen["input_ids"][:shared], dtype=torch.long)
        position_ids[b, :shared] = torch.arange(shared)
        segment_ids[b, :shared] = SHARED
        start = shared
        for row, side, segment in ((b, chosen, CHOSEN), (count + b, rejected, REJECTED)):
            branch = side["input_ids"][shared:]
            end = start + len(branch)
            input_ids[b, start:end] = torch.tensor(branch, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(shared, shared + len(branch))
            segment_ids[b, start:end] = segment
            labels[row, start:end] = torch.tensor(shift_labels(side["labels"])[shared:], dtype=torch.long)
            start = end
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": tree_mask(segment_ids), "pairs": count}


def make_shared_prompt_batches(examples: list[Pair], batch_size: int, *, max_length: int, pad_id: int, seed: int,
                               epoch: int = 0, shuffle: bool = True) -> LazyBatches:
    """`make_pair_batches`' batches (the same pairs in the same order), each pair one shared-prompt row."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    _check_pairs(examples, max_length)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    groups = [[examples[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    return LazyBatches(groups, lambda group: collate_shared_prompt(group, pad_id), row_length)


def _probe_pairs(vocab_size: int) -> list[Pair]:
    """Two random pairs with prompts of 5 and 1 tokens and answers of different lengths."""
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    pairs = []
    for prompt_length, chosen, rejected in ((5, 3, 4), (1, 2, 5)):
        prompt = ids(prompt_length)
        sides = {}
        for name, n in (("chosen", chosen), ("rejected", rejected)):
            answer = ids(n)
            sides[name] = {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * prompt_length + answer}
        pairs.append({**sides, "prompt_length": prompt_length})
    return pairs


def _answer_logits(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The logits (N, V) at the trained positions of `labels` (R, T); logits of row rows[r] serve label row r."""
    where = (labels != IGNORE_INDEX).nonzero()  # (N, 2): (label row, position), row-major
    return logits[rows[where[:, 0]], where[:, 1]].float()


def shared_prompt_problem(model: Any, max_length: int | None = None, tolerance: float | None = None
                          ) -> PackingProblem | None:
    """Why the shared-prompt layout is not exact on `model`, or None when its answer logits equal the padded
    pairs' on a probe (two random pairs; no gradient; the model's mode is kept)."""
    model_type = getattr(model.config, "model_type", "unknown")
    window = sliding_window(model.config)
    longest = 2 * max_length if max_length else getattr(model.config, "max_position_embeddings", None)
    if window is not None and (longest is None or longest > window):
        return PackingProblem(f"the shared-prompt layout is not exact for model type {model_type!r}: its sliding-"
                              f"window attention (window {window}) cannot be expressed by the row's mask",
                              "set data.packing: false")
    parameter = next(model.parameters())
    pairs = _probe_pairs(model.get_input_embeddings().num_embeddings)
    padded = collate_pairs([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id=0)
    shared = collate_shared_prompt(pairs, pad_id=0)
    was_training = model.training
    model.eval()
    with packed_forward(model) as changed:
        try:
            with torch.no_grad():
                padded_logits = model(input_ids=padded["input_ids"].to(parameter.device),
                                      attention_mask=padded["attention_mask"].to(parameter.device)).logits
                shared_logits = model(**{key: shared[key].to(parameter.device) for key in
                                         ("input_ids", "position_ids", "attention_mask")}).logits
        except Exception as error:
            how = f"; {changed}" if changed else ""
            return PackingProblem(f"the shared-prompt layout is not supported for model type {model_type!r}{how}: "
                                  f"the model failed on it ({type(error).__name__}: {error})",
                                  "set data.packing: false", error)
        finally:
            model.train(was_training)
    expected = _answer_logits(padded_logits, padded["labels"].to(parameter.device),
                              torch.arange(2 * len(pairs), device=parameter.device))
    found = _answer_logits(shared_logits, shared["labels"].to(parameter.device),
                           torch.arange(len(pairs), device=parameter.device).repeat(2))
    if tolerance is None:
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 2e-2
    difference = (found - expected).abs().max().item()
    if found.shape != expected.shape or difference > tolerance * max(1.0, expected.abs().max().item()):
        return PackingProblem(f"the shared-prompt layout is not exact for model type {model_type!r} (attention "
                              f"implementation {getattr(model.config, '_attn_implementation', '?')!r}): an answer's "
                              f"logits differ by {difference:.3g} from its padded row's", "set data.packing: false")
    return None


def shared_prompt_note(model: Any, max_length: int, effect: str = "") -> tuple[bool, str]:
    """(whether to lay pairs out with a shared prompt, the line to print): the probe's verdict on `model` at
    `max_length`; `effect`: what the layout saves on the run's pairs, in words, for the line."""
    found = shared_prompt_problem(model, max_length)
    if found is not None:
        return False, f"pair layout: padded pairs (auto: {found.reason})"
    effect = f": {effect}" if effect else ""
    return True, ("pair layout: shared prompt (auto: the probe shows this model's answer logits on shared-prompt rows "
                  f"equal to the padded pairs'; each pair is one row, its prompt computed once{effect}; "
                  "data.packing=false for padded pairs)")
