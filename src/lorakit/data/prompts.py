"""Prompt rows, for objectives that sample their answers (train.objective grpo): rows -> prompt ids -> batches.

A prompt row holds a question and whatever else a reward reads (e.g. `answer`); nothing in it is trained:

    prompt (text)          {"prompt": "What is 2 + 2?", "answer": "4"}: through data.prompt_template, as the
                           prompt of a prompt_completion row
    prompt (messages)      {"prompt": [{"role": "user", "content": ...}], ...}: TRL's conversational prompt
    messages               {"messages": [...], ...} (or ShareGPT's `conversations`): a conversation that ends
                           with the turn to answer (a user turn), through the chat template

The prompt becomes token ids by data/prompting.py's `PromptFormat`, the very renderers training uses
(segment by segment, the same BOS rule), so the model sees the prompt it would see before a trained
answer, and the run records the format for inference. One run has one format: `prompt_rows_format`
decides it (data.format prompt_completion or chat, or auto from the rows). A prompt longer than
data.max_length loses tokens from the left (its BOS kept), as truncation 'prompt' cuts SFT context: the
end of a prompt holds the answer cue; data.truncation drop leaves such rows out instead.

A prompt batch: input_ids and attention_mask (P, T), right-padded; `PROMPT_INDEX` (P,), each prompt's
index in the run's prompt table (the row a reward reads, and the identity its sampling seed is derived
from); labels (P, 1), 0 for every prompt to sample (a rank's filler copy, distributed.silent_copy, has
-100 there and trains nothing). Every value is a tensor whose first dim is the prompt, so a batch splits
by prompts (train/step.py `split_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.data.batching import LazyBatches, epoch_order
from lorakit.data.chat import CHAT_COLUMNS, _message, chat_column
from lorakit.data.config import DataConfig
from lorakit.data.formats import apply_columns, text_field
from lorakit.data.prompting import PromptFormat
from lorakit.data.rows import RowError, place_of
from lorakit.data.tokenize import TokenizeStats, bos_prefix, keep_front, truncate
from lorakit.errors import DataError
from lorakit.labels import IGNORE_INDEX

PROMPT_INDEX = "prompt_index"  # a prompt batch's (P,) indices into the run's prompt table
PROMPT_FORMATS = ("prompt_completion", "chat")  # the SFT formats whose prompts a prompt row can be


@dataclass
class PromptExample:
    """One prompt: its token ids in the run's format, its index in the run's prompt table, and its row."""

    input_ids: list[int]
    index: int  # in the run's prompt table (training prompts, then validation prompts)
    row: dict[str, Any] = field(repr=False)  # the row's fields (after data.columns), as the rewards get them


def _is_chat(row: dict[str, Any]) -> bool:
    """Whether a (column-mapped) prompt row holds messages rather than a text prompt."""
    return isinstance(row.get("prompt"), list) or ("prompt" not in row and any(c in row for c in CHAT_COLUMNS))


def prompt_rows_format(rows: list[dict[str, Any]], cfg: DataConfig) -> str:
    """'chat' or 'prompt_completion': data.format when it is one of them, else the kind of the first row that
    has a prompt (a text `prompt`: prompt_completion; `messages`, `conversations` or a `prompt` list: chat)."""
    if cfg.format != "auto":
        if cfg.format not in PROMPT_FORMATS:
            raise DataError(f"data.format is {cfg.format}, but train.objective grpo samples answers to prompt rows: "
                            "set data.format to prompt_completion (a text `prompt`), chat (`messages`) or auto")
        return cfg.format
    for row in rows:
        try:
            mapped = apply_columns(row, cfg.columns)
        except RowError:  # tokenizing names the row
            continue
        if "prompt" in mapped or any(c in mapped for c in CHAT_COLUMNS):
            return "chat" if _is_chat(mapped) else "prompt_completion"
    raise DataError("train.objective grpo samples answers to prompt rows, and no row has a `prompt` (text or "
                    "messages) or `messages` column; map other column names with data.columns")


def prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a chat prompt row, up to the turn the model answers."""
    column = "prompt" if "prompt" in row else chat_column(row)
    value = row.get(column)
    if isinstance(value, str):  # a text prompt in a chat run: one user message
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"field {column!r} must be a non-empty list of {{role, content}} messages"
                       + ("" if column in row else f" (columns: {', '.join(row) or 'none'})"))
    messages = [_message(item, f"{column}[{j}]") for j, item in enumerate(value)]
    if messages[-1]["role"] == "assistant":
        raise RowError(f"field {column!r} ends with an assistant turn; a prompt ends with the turn the model "
                       "answers (drop the answer, and keep it in another field for the reward, e.g. `answer`)")
    return messages


def prompt_ids(row: dict[str, Any], prompt: PromptFormat, tokenizer: Any) -> list[int]:
    """Token ids of one (column-mapped) prompt row in the run's format."""
    if prompt.format == "chat":
        return prompt.messages_ids(tokenizer, prompt_messages(row))
    if _is_chat(row):
        raise RowError("the row holds messages, but the run's prompts are text (prompt_completion, from the first "
                       "row or data.format): one run has one prompt format")
    return prompt.prompt_ids(tokenizer, text_field(row, "prompt"))


def tokenize_prompt_rows(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig, prompt: PromptFormat,
                         first_index: int = 0) -> tuple[list[PromptExample], TokenizeStats]:
    """The prompts of `rows` in the run's format `prompt`, held to cfg.max_length tokens (see the module
    docstring), numbered from `first_index`. A row that does not fit is a DataError naming it, or (data.
    skip_bad_rows) skipped and counted; so is a list of rows that yields nothing."""
    if not rows:
        return [], TokenizeStats()
    bos = bos_prefix(tokenizer)  # no EOS is needed: nothing is trained here (the rollout's stop tokens may be none)
    stats = TokenizeStats(n_rows=len(rows))
    examples: list[PromptExample] = []
    mode = "drop" if cfg.truncation == "drop" else "prompt"
    for k, row in enumerate(rows):
        try:
            mapped = apply_columns(row, cfg.columns)
            ids = prompt_ids(mapped, prompt, tokenizer)
        except (RowError, DataError) as error:
            if cfg.skip_bad_rows:
                stats.n_skipped_bad_rows += 1
                continue
            raise DataError(f"{place_of(rows, k)}: {error}") from None
        ids, _, outcome = truncate(ids, [IGNORE_INDEX] * len(ids), len(ids), keep_front(ids, bos, tokenizer),
                                   cfg.max_length, mode)
        if outcome == "dropped":
            stats.n_dropped += 1
            continue
        stats.n_truncated += outcome == "truncated"
        examples.append(PromptExample(ids, first_index + len(examples), mapped))
        stats.n_tokens += len(ids)
    stats.n_examples = len(examples)
    if not examples:
        raise DataError(f"none of the {len(rows)} rows gave a prompt ({stats.summary()})")
    return examples, stats


def collate_prompts(examples: list[PromptExample], pad_id: int) -> dict[str, torch.Tensor]:
    """P prompts -> one right-padded prompt batch (the module docstring's layout)."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (P, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (P, T)
    for p, ex in enumerate(examples):
        input_ids[p, :len(ex.input_ids)] = torch.tensor(ex.input_ids)
        attention_mask[p, :len(ex.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.zeros((len(examples), 1), dtype=torch.long),  # (P, 1): every prompt is sampled
            PROMPT_INDEX: torch.tensor([ex.index for ex in examples], dtype=torch.long)}


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The token ids of every prompt of a prompt batch (its padding removed)."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


def make_prompt_batches(examples: list[PromptExample], batch_size: int, *, max_length: int, pad_id: int,
                        seed: int, epoch: int = 0, shuffle: bool = True) -> LazyBatches:
    """One epoch of prompt batches of `batch_size` prompts (collated on access); the same (seed, epoch) gives the
    same order (data/batching.py `epoch_order`, as SFT examples are ordered)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    for ex in examples:
        if not 0 < len(ex.input_ids) <= max_length:
            raise DataError(f"prompt {ex.index} has {len(ex.input_ids)} tokens; prompts must have 1 to max_length="
                            f"{max_length} tokens (tokenize_prompt_rows holds them to it)")
    order = epoch_order(len(examples), seed, epoch, shuffle)
    groups = [[examples[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    return LazyBatches(groups, lambda group: collate_prompts(group, pad_id), lambda ex: len(ex.input_ids))


def preview_prompt(example: PromptExample, tokenizer: Any) -> str:
    """A prompt as the model sees it (special tokens shown), and the row's other fields the rewards read."""
    fields = {key: value for key, value in example.row.items() if key not in ("prompt", *CHAT_COLUMNS)}
    shown = ", ".join(f"{key}={value!r}" for key, value in fields.items()) or "none"
    return f"{tokenizer.decode(example.input_ids, skip_special_tokens=False)!r}; the row's other fields: {shown}"
