"""`lorakit evaluate`: exact-match accuracy and loss of a model (+ adapter) on a dataset."""
from __future__ import annotations

import argparse
import json


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


def run(args: argparse.Namespace) -> int:
    """Load, score and print; returns the exit status."""
    from lorakit.infer.evaluate import evaluate, read_rows
    from lorakit.infer.metrics import exact_match
    from lorakit.models import dataset_path, load_model, load_tokenizer, quiet_progress_bars

    quiet_progress_bars()
    rows = read_rows(dataset_path(args.data), prompt_column=args.prompt_column,
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
