"""Preference rows -> pairs of examples -> batches of pairs, for the preference objectives (DPO and its family).

    pairs, stats = tokenize_preference_rows(rows, tokenizer, cfg)   # rows: prompt/chosen/rejected (data/pairs.py)
    print(preview_pair(pairs[0], tokenizer))                        # the shared prompt, both answers' trained spans
    batches = make_pair_batches(pairs, 8, max_length=cfg.max_length, pad_id=pad_id, seed=0, epoch=0)

A pair is {"chosen": Example, "rejected": Example, "prompt_length": P}: each side the SFT example shape
(data/tokenize.py: input_ids, labels aligned to them, IGNORE_INDEX where untrained), both beginning with
the same P prompt ids, untrained. A batch holds B pairs as 2B padded rows: rows 0..B-1 the chosen sides,
rows B..2B-1 the rejected sides in the same pair order, labels shifted as `make_batches` shifts them.
"""
from __future__ import annotations

from typing import Any

from lorakit.data.batching import LazyBatches, collate_padded, epoch_order
from lorakit.data.config import DataConfig
from lorakit.data.formats import apply_columns
from lorakit.data.pairs import SIDES, RenderedPair, explicit_row, is_chat_row
from lorakit.data.rows import RowError, place_of
from lorakit.data.tokenize import (Example, TokenizeStats, bos_prefix, check_tokenizer, encode, keep_front,
                                   n_trained, preview_example, rendered_rows, resolve_format, segment_encoder,
                                   truncate, untrained_error)
from lorakit.errors import DataError
from lorakit.labels import IGNORE_INDEX

Pair = dict[str, Any]  # {"chosen": Example, "rejected": Example, "prompt_length": int}
Side = tuple[list[int], list[int]]  # (input_ids, labels)
OUTCOMES = ("fit", "truncated", "answer_cut", "dropped")  # truncate()'s outcomes, mildest first


def truncate_pair(chosen: Side, rejected: Side, prompt_length: int, front: int, max_length: int, mode: str
                  ) -> tuple[Side, Side, int, str]:
    """Shorten a pair to max_length tokens a side as one: (chosen, rejected, prompt length, outcome).

    Mode 'prompt' keeps the first `front` tokens (BOS) and then as many of the prompt's last tokens as fit
    beside the longer answer, the same on both sides, so both keep one prompt; when the longer answer alone is
    too long, both answers are cut at their end ('answer_cut'). Mode 'end' cuts each side's end (the prompt
    is a prefix of both, so both keep the same prompt); 'drop' drops the pair when either side is too long.
    """
    sides = (chosen, rejected)
    if all(len(ids) <= max_length for ids, _ in sides):
        return chosen, rejected, prompt_length, "fit"
    if mode != "prompt":
        cut = [truncate(ids, labels, prompt_length, front, max_length, mode) for ids, labels in sides]
        outcome = max((outcome for _, _, outcome in cut), key=OUTCOMES.index)
        kept = min(prompt_length, *(len(ids) for ids, _, _ in cut))
        return cut[0][:2], cut[1][:2], kept, outcome
    front = min(front, prompt_length)
    longest = max(len(ids) for ids, _ in sides) - prompt_length
    room = max(0, max_length - front - longest)  # prompt tokens after the front that fit beside the longer answer
    answer_room = max_length - front - room
    kept = [(ids[:front] + ids[prompt_length - room:prompt_length] + ids[prompt_length:][:answer_room],
             labels[:front] + labels[prompt_length - room:prompt_length] + labels[prompt_length:][:answer_room])
            for ids, labels in sides]
    answer_cut = any(label != IGNORE_INDEX for _, labels in sides for label in labels[prompt_length + answer_room:])
    return kept[0], kept[1], front + room, "answer_cut" if answer_cut else "truncated"


def _encode_pair(pair: RenderedPair, encode_segment: Any, bos: list[int], eos_id: int
                 ) -> tuple[Side, Side, int]:
    """(chosen, rejected, prompt length): each side encoded segment by segment, so both begin with the ids the
    prompt's segments have alone."""
    prompt_ids, _, _ = encode(pair.prompt_only(), encode_segment, bos, eos_id, train_on_prompt=False)
    chosen, rejected = (encode(pair.side(name), encode_segment, bos, eos_id, train_on_prompt=False)[:2]
                        for name in SIDES)
    return chosen, rejected, len(prompt_ids)


def tokenize_preference_rows(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig
                             ) -> tuple[list[Pair], TokenizeStats]:
    """Render, tokenize, mask and truncate preference rows into pairs (see the module docstring).

    The SFT rules hold (tokenize_rows): a bad row is an error naming its place, or skipped and counted with
    data.skip_bad_rows; a side left with no trained token is an error naming the row and side, or (with
    data.drop_untrained) drops the pair; truncation follows data.truncation, a pair cut as one
    (`truncate_pair`). Stats count pairs, and the tokens of both sides. Rows of an SFT format are an error
    that names the objective for them; so is data.train_on_prompt (the prompt is shared, never trained).
    """
    if not rows:
        return [], TokenizeStats()
    check_tokenizer(tokenizer)
    fmt = resolve_format(rows, cfg, pairs=True)
    if cfg.train_on_prompt:
        raise DataError("data.train_on_prompt does not apply to preference rows: both answers share one prompt, "
                        "which is never trained; set it to false")
    bos = bos_prefix(tokenizer)
    encode_segment = segment_encoder(tokenizer)
    stats = TokenizeStats(n_rows=len(rows))
    pairs: list[Pair] = []
    for k, rendered in rendered_rows(rows, fmt.render_pair, tokenizer, cfg, stats):
        chosen, rejected, prompt_length = _encode_pair(rendered, encode_segment, bos, tokenizer.eos_token_id)
        front = keep_front(chosen[0], bos, tokenizer)
        chosen, rejected, prompt_length, outcome = truncate_pair(chosen, rejected, prompt_length, front,
                                                                 cfg.max_length, cfg.truncation)
        stats.n_truncated += outcome in ("truncated", "answer_cut")
        stats.n_answers_cut += outcome == "answer_cut"
        trained = [n_trained(labels) for _, labels in (chosen, rejected)]
        if outcome != "dropped" and 0 in trained:
            if not cfg.drop_untrained:
                raise untrained_error(place_of(rows, k), fmt, cfg, f" in {SIDES[trained.index(0)]!r}")
            outcome = "dropped"
        if outcome == "dropped":
            stats.n_dropped += 1
            continue
        pairs.append({"chosen": {"input_ids": chosen[0], "labels": chosen[1]},
                      "rejected": {"input_ids": rejected[0], "labels": rejected[1]},
                      "prompt_length": prompt_length})
        stats.n_trained_tokens += sum(trained)
        stats.n_tokens += len(chosen[0]) + len(rejected[0])
    stats.n_examples = len(pairs)
    if not pairs:
        raise DataError(f"none of the {len(rows)} rows gave a pair ({stats.summary()})")
    return pairs, stats


def prompt_format_name(rows: list[dict[str, Any]], cfg: DataConfig) -> str:
    """The SFT row format whose prompts a preference run's prompts are ('chat' or 'prompt_completion'): what a
    run records (data/prompting.py's PromptFormat) so generation and scoring prompt as training did."""
    for row in rows:
        try:
            return "chat" if is_chat_row(explicit_row(apply_columns(row, cfg.columns))) else "prompt_completion"
        except RowError:
            continue
    return "prompt_completion"


# -- batches ---------------------------------------------------------------------------------------------------

def _check_pairs(pairs: list[Pair], max_length: int) -> None:
    for i, pair in enumerate(pairs):
        for name in SIDES:
            n = len(pair[name]["input_ids"])
            if n != len(pair[name]["labels"]):
                raise DataError(f"pair {i}: its {name} side has {n} input_ids but {len(pair[name]['labels'])} labels")
            if n == 0 or n > max_length:
                raise DataError(f"pair {i}: its {name} side has {n} tokens; each side must have 1 to max_length="
                                f"{max_length} tokens (tokenize_preference_rows truncates them)")


def collate_pairs(sides: list[Example], pad_id: int) -> dict[str, Any]:
    """2B examples (B chosen, then the B rejected in the same order) -> one padded batch with "pairs": B."""
    batch: dict[str, Any] = collate_padded(sides, pad_id)  # input_ids, labels (shifted), attention_mask: (2B, T)
    batch["pairs"] = len(sides) // 2
    return batch


def make_pair_batches(examples: list[Pair], batch_size: int, *, max_length: int, pad_id: int, seed: int,
                      epoch: int = 0, shuffle: bool = True) -> LazyBatches:
    """One epoch of pair batches (collated on access); the same (seed, epoch) gives the same pair order.

    `batch_size` pairs per batch; each batch is {"input_ids", "labels", "attention_mask": (2B, T), "pairs": B},
    right-padded with `pad_id`: rows 0..B-1 the chosen sides, rows B..2B-1 the rejected sides, pair i in rows
    i and B + i. `row_lengths()` gives the real tokens of the 2B rows of each batch.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    _check_pairs(examples, max_length)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    groups = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        groups.append([pair["chosen"] for pair in chunk] + [pair["rejected"] for pair in chunk])
    return LazyBatches(groups, lambda group: collate_pairs(group, pad_id), lambda ex: len(ex["input_ids"]))


# -- the pre-flight preview --------------------------------------------------------------------------------

def preview_pair(example: Pair, tokenizer: Any) -> str:
    """A pair as text: the shared prompt once, then each side's answer with its trained spans in [[...]]."""
    prompt_length = example["prompt_length"]
    chosen = example["chosen"]
    lines = [f"prompt (shared, {prompt_length} tokens): "
             + preview_example({key: chosen[key][:prompt_length] for key in ("input_ids", "labels")}, tokenizer)]
    for name in SIDES:
        side = example[name]
        answer = {key: side[key][prompt_length:] for key in ("input_ids", "labels")}
        trained = sum(label != IGNORE_INDEX for label in answer["labels"])
        lines.append(f"{name} ({trained} tokens trained): "
                     + preview_example(answer, tokenizer))
    return "\n".join(lines)
