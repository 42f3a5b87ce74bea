"""Score a model (optionally with an adapter) on a dataset (the `lorakit evaluate` command is commands/evaluate.py).

Rows with "prompt" and "completion" are scored three ways: the greedy answer's exact-match and
contains accuracy, and the mean token loss (and perplexity) of the reference completion plus
EOS. Rows with only "text" (e.g. the general-text set used to measure forgetting) get the loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorakit.data.config import DataConfig
from lorakit.data.sources import read_source
from lorakit.errors import DataError
from lorakit.infer.generate import greedy_generate
from lorakit.infer.metrics import accuracy, token_loss


def evaluate(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 16,
             batch_size: int = 32, generate: bool = True) -> dict:
    """Accuracy (exact-match, contains) and loss/perplexity of `model` on `rows`.

    Returns {"n", "exact_match", "contains", "loss", "perplexity", "tokens", "predictions"}; the
    accuracy keys (and predictions) are present only for prompt/completion rows with `generate`.
    """
    if not rows:
        raise DataError("nothing to evaluate: the dataset has no rows")
    if all("text" in row and "completion" not in row for row in rows):
        pairs = [("", str(row["text"])) for row in rows]
        return {"n": len(rows), **token_loss(model, tokenizer, pairs, batch_size=batch_size)}
    for index, row in enumerate(rows):
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise DataError(f"row {index}: field {field!r} is missing or not a string "
                                "(evaluate needs prompt/completion rows, or text rows)")
    prompts = [row["prompt"] for row in rows]
    references = [row["completion"] for row in rows]
    result: dict = {"n": len(rows)}
    if generate:
        predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)
        result.update(accuracy(predictions, references))
        result["predictions"] = predictions
    result.update(token_loss(model, tokenizer, list(zip(prompts, references)),
                             batch_size=batch_size))
    return result


def read_rows(path: str | Path, *, prompt_column: str = "prompt",
              completion_column: str = "completion", limit: int | None = None) -> list[dict]:
    """Rows of a local data file (json, jsonl, csv, parquet: the training reader, data.sources), with the
    given columns renamed to prompt/completion."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    source = read_source(str(path), "train", DataConfig(source=str(path)))
    rows = source if isinstance(source, list) else source.to_list()
    renamed = []
    for row in rows[:limit]:
        row = dict(row)
        if prompt_column in row:
            row["prompt"] = row.pop(prompt_column)
        if completion_column in row:
            row["completion"] = row.pop(completion_column)
        renamed.append(row)
    return renamed
