"""Score a model (optionally with an adapter) on a dataset, and the `lorakit evaluate` command.

Rows with "prompt" and "completion" are scored three ways: the greedy answer's exact-match and
contains accuracy, and the mean token loss (and perplexity) of the reference completion plus
EOS. Rows with only "text" (e.g. the general-text set used to measure forgetting) get the loss.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import DataError
from lorakit.infer.generate import greedy_generate
from lorakit.infer.metrics import accuracy, exact_match, token_loss


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
    from lorakit.data.config import DataConfig
    from lorakit.data.sources import read_source

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit evaluate`."""
    parser.add_argument("--model", default="embedded",
                        help="base model: 'embedded', a local folder or a hub id")
    parser.add_argument("--adapter", default=None, help="adapter folder to put on the model")
    parser.add_argument("--data", required=True,
                        help="a .jsonl/.json file of prompt/completion (or text) rows, or one of "
                             "the embedded sets: embedded-train, embedded-eval, embedded-general")
    parser.add_argument("--prompt-column", default="prompt", help="column holding the prompt")
    parser.add_argument("--completion-column", default="completion",
                        help="column holding the reference answer")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length cap")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda")
    parser.add_argument("--show", type=int, default=5, help="print this many example answers")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from the hub (only if you trust it)")


def _data_path(name: str) -> Path:
    from lorakit.lab.datasets import EMBEDDED_DATASETS

    return EMBEDDED_DATASETS.get(name, Path(name))


def run(args: argparse.Namespace) -> int:
    """Load, score and print; returns the exit status."""
    from lorakit.models import load_model, load_tokenizer, quiet_progress_bars

    quiet_progress_bars()
    rows = read_rows(_data_path(args.data), prompt_column=args.prompt_column,
                     completion_column=args.completion_column, limit=args.limit)
    model = load_model(args.model, dtype=args.dtype, device=args.device,
                       trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        from lorakit.adapters import load_adapter

        model = load_adapter(model, args.adapter)
    result = evaluate(model, tokenizer, rows, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
    predictions = result.pop("predictions", None)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_result(result))
    for row, answer in list(zip(rows, predictions or []))[: args.show]:
        mark = "ok " if exact_match(answer, row["completion"]) else "   "
        print(f"{mark}{row['prompt']!r} -> {answer.strip()!r} (reference {row['completion'].strip()!r})")
    return 0


def format_result(result: dict) -> str:
    """One line per metric, for the terminal."""
    lines = [f"rows        {result['n']}"]
    if "exact_match" in result:
        lines.append(f"exact match {result['exact_match']:.1%}")
        lines.append(f"contains    {result['contains']:.1%}")
    lines.append(f"loss        {result['loss']:.4f} over {result['tokens']} tokens "
                 f"(perplexity {result['perplexity']:.2f})")
    return "\n".join(lines)
