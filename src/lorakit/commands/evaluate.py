"""`lorakit evaluate [RUN]`: exact-match accuracy, contains and loss of a model (+ adapter) on a dataset.

`lorakit evaluate runs/NAME` scores the run's adapter (or model) on the run's own validation rows;
`--data FILE` scores rows of any training format. Prompts get the run's recorded prompt format
(infer/generate.py's rule) and the loss is training's (infer/evaluate.py's `evaluate_rows`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lorakit import dtypes
from lorakit.commands.inputs import add_format_arguments
from lorakit.errors import LorakitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit evaluate`."""
    parser.epilog = ("examples:\n  lorakit evaluate runs/my-run\n"
                     "  lorakit evaluate runs/my-run --data test.jsonl --by category\n"
                     "  lorakit evaluate --adapter runs/my-run/adapter --data embedded-eval --json\n")
    parser.add_argument("run", nargs="?", default=None, metavar="RUN",
                        help="a run folder: its adapter (or model) on its validation rows, in its prompt format")
    parser.add_argument("--model", default=None,
                        help="base model: 'embedded', a local folder or a hub id (default: the base recorded with "
                             "the adapter, else its adapter_config.json, else 'embedded')")
    parser.add_argument("--adapter", default=None, help="adapter folder to put on the model")
    parser.add_argument("--data", default=None,
                        help="a .jsonl/.json/.csv/.parquet file of rows in any training format (prompt/completion, "
                             "alpaca, chat messages, text), or one of the embedded sets: embedded-train, "
                             "embedded-eval, embedded-general (default with RUN: its validation rows)")
    parser.add_argument("--format", default=None,
                        help="the rows' format: prompt_completion, alpaca, chat or text (default: the run's, else "
                             "detected from the columns)")
    parser.add_argument("--columns", default=None, type=json.loads,
                        help='JSON map of format field to the file\'s column, e.g. \'{"prompt": "q", "completion": "a"}\'')
    parser.add_argument("--prompt-column", default=None, help="column holding the prompt (short for --columns)")
    parser.add_argument("--completion-column", default=None, help="column holding the reference answer")
    parser.add_argument("--by", default=None, metavar="COLUMN",
                        help="also score each value of this row column apart (default: 'kind', 'category' or "
                             "'task' when the rows have it; 'none': no groups)")
    add_format_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length cap")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--dtype", default=None, help=f"{dtypes.accepted()} (default: as saved)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda")
    parser.add_argument("--show", type=int, default=5, help="print this many example answers")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from the hub (only if you trust it)")


def run(args: argparse.Namespace) -> int:
    """Load, score and print; returns the exit status."""
    from lorakit.data.rows import keep_places
    from lorakit.infer.evaluate import as_conversation, evaluate_rows, group_column, scoring_format
    from lorakit.infer.generate import load_target, resolve_target

    columns = _columns(args)
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON alone
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731
    if args.run is not None:
        if args.adapter is not None:
            raise LorakitError(f"give a run folder ({args.run}) or --adapter, not both")
        folder, cfg = _run_config(args.run)
        target = resolve_target(folder, args.model)
        rows, data_cfg = _run_rows(args, cfg, columns, say)
    elif args.data is not None:
        target, cfg = resolve_target(args.adapter, args.model), None
        rows, data_cfg = _file_rows(args.data, args.limit), _data_config(None, columns)
    else:
        raise LorakitError("nothing to evaluate: give a run folder (lorakit evaluate runs/NAME) or --data FILE")
    model, tokenizer = load_target(target, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code, log=say)
    recorded, where = _recorded(target, cfg, rows, tokenizer)
    prompt_format, line = scoring_format(rows, data_cfg.columns, tokenizer, recorded=recorded, where=where,
                                         raw=args.raw, chat=args.chat, forced=args.format)
    say(line)
    if args.chat:
        detected = _detected(rows, data_cfg, args.format)
        rows, data_cfg = (keep_places([as_conversation(r, detected, data_cfg.columns) for r in rows], rows),
                          _data_config(data_cfg, {}))
    column = group_column(rows, args.by)
    if column is not None and args.by is None:
        say(f"groups: by {column!r}, a column of the rows (--by COLUMN to choose another, --by none for no groups)")
    result = evaluate_rows(model, tokenizer, rows, prompt_format, data_cfg=data_cfg, by=column or "none",
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    shown = {key: result.pop(key) for key in ("questions", "predictions", "references")}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_result(result))
    _show_examples(shown, args.show)
    return 0


def _columns(args: argparse.Namespace) -> dict[str, str]:
    given = args.columns or {}
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise LorakitError(f"--columns must be a JSON object of field to column names, got {args.columns!r}")
    columns = dict(given)
    for field, column in (("prompt", args.prompt_column), ("completion", args.completion_column)):
        if column is not None and column != field:
            columns[field] = column
    return columns


def _run_config(run: str):
    """(the run's adapter or model folder, its RunConfig)."""
    from lorakit.config import build_config, read_yaml
    from lorakit.run import CONFIG_FILE

    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise LorakitError(f"{run} is not a run folder: it has no {CONFIG_FILE} (for an adapter folder use "
                           "--adapter FOLDER --data FILE)")
    cfg = build_config(read_yaml(path))
    folder = Path(run) / cfg.method.output
    if not folder.is_dir():
        raise LorakitError(f"{run} has no {cfg.method.output}/ folder: the run has not finished")
    return folder, cfg


def _run_rows(args: argparse.Namespace, cfg, columns: dict[str, str], say) -> tuple[list[dict], object]:
    """The rows to score for a run: --data, else the run's validation rows; and the run's data config (its
    media_dir, like its sources, read from where the run was started)."""
    from lorakit.data import load_rows
    from lorakit.data.rows import keep_places

    if args.data is not None:
        data = _rebased(cfg.data, Path(args.run), cfg, say, keys=("media_dir",))
        return _file_rows(args.data, args.limit), _data_config(data, columns)
    data = run_data(Path(args.run), cfg, say)
    _, rows = load_rows(data)
    if not rows:
        raise LorakitError(f"{args.run} has no validation rows (its data config sets no val_source, val_split or "
                           "val_fraction); score a file with --data FILE")
    rows = keep_places(rows[:args.limit], rows) if args.limit else rows
    say(f"data: the run's {len(rows)} validation rows (--data FILE to score others)")
    return rows, _data_config(data, columns or cfg.data.columns)


def run_data(run: Path, cfg, say):
    """A run folder's data config as its rows are read from here: embedded names resolved, relative paths
    `_rebased`; its `load_rows` are the run's (training rows, validation rows)."""
    from lorakit.run import resolve_embedded_data

    return _rebased(resolve_embedded_data(cfg.data), run, cfg, say)


def _rebased(data_cfg, run: Path, cfg, say, keys: tuple[str, ...] = ("source", "val_source", "media_dir")):
    """The data config with relative file paths (`keys`) that do not exist from here taken from the folder the run
    was started in (the run folder minus its relative output_dir/name), so a run evaluates from any folder."""
    tail = (Path(cfg.output_dir) / run.resolve().name).parts
    parts = run.resolve().parts
    if Path(cfg.output_dir).is_absolute() or parts[-len(tail):] != tail:
        return data_cfg
    started = Path(*parts[:-len(tail)])
    moved = {}
    for key in keys:
        value = getattr(data_cfg, key)
        if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() \
                and (started / value).exists():
            moved[key] = str(started / value)
            say(f"data: {key} {value} is read from {started}, where the run was started")
    return dataclasses.replace(data_cfg, **moved) if moved else data_cfg


def _file_rows(name: str, limit: int | None) -> list[dict]:
    from lorakit.infer.evaluate import read_rows
    from lorakit.models import dataset_path

    return read_rows(dataset_path(name), limit=limit)


def _data_config(base, columns: dict[str, str]):
    """The run's data config (or the defaults) with these columns: how the rows become examples."""
    from lorakit.data import DataConfig

    return dataclasses.replace(base or DataConfig(), columns=columns)


def _recorded(target, cfg, rows: list[dict], tokenizer):
    """(the run's prompt format, where it comes from): the record, else the run's config, else none."""
    from lorakit.data.prompting import PromptFormat
    from lorakit.data.tokenize import resolve_format

    if target.record is not None:
        return target.record.prompt, f"recorded with {target.source}"
    if cfg is not None:
        name = resolve_format(rows, cfg.data).name
        return PromptFormat.of_run(cfg.data, name, tokenizer), "from the run's config.yaml; its output has no record"
    return None, ""


def _detected(rows: list[dict], data_cfg, forced: str | None) -> str:
    from lorakit.data.tokenize import resolve_format

    return resolve_format(rows, dataclasses.replace(data_cfg, format=forced or "auto")).name


def format_result(result: dict) -> str:
    """One line per metric, and a table of the groups, for the terminal."""
    lines = [f"rows        {result['n']}"]
    if "exact_match" in result:
        lines.append(f"exact match {result['exact_match']:.1%}")
        lines.append(f"contains    {result['contains']:.1%}")
    lines.append(f"loss        {result['loss']:.4f} over {result['tokens']} tokens "
                 f"(perplexity {result['perplexity']:.2f})")
    groups = result.get("groups") or {}
    if groups:
        width = max(len(result["by"]), *(len(name) for name in groups))
        lines.append("")
        lines.append(f"{result['by']:<{width}}  rows  exact  contains    loss")
        for name, scores in groups.items():
            accuracy = (f"{scores['exact_match']:6.1%}  {scores['contains']:7.1%}" if "exact_match" in scores
                        else f"{'-':>6}  {'-':>7}")
            lines.append(f"{name:<{width}}  {scores['n']:>4}  {accuracy}  {scores['loss']:6.4f}")
    return "\n".join(lines)


def _show_examples(shown: dict[str, list[str]], count: int) -> None:
    from lorakit.infer.metrics import exact_match

    for question, answer, reference in list(zip(*shown.values()))[:count]:
        mark = "ok " if exact_match(answer, reference) else "   "
        print(f"{mark}{question!r} -> {answer.strip()!r} (reference {reference!r})")
