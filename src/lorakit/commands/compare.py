"""`lorakit compare PROMPT... --adapter A --adapter B`: base and adapters side by side, one batch.

Every (prompt, model) pair is a row of one batch through the per-row multi-adapter path, so the
base model is loaded once and nothing is merged. Greedy by default; with --temperature every row
samples from its own generator seeded by --seed, so a report is reproducible.
"""
from __future__ import annotations

import argparse
import html
import shutil
import textwrap
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.commands.inputs import (add_decoding_arguments, add_model_arguments, load_base, read_prompts,
                                  sampling_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompts, adapters, decoding options and the report file."""
    parser.epilog = ("example:\n  lorakit compare 'What is the capital of Peru?' --adapter runs/a/adapter "
                     "--adapter tuned=runs/b/adapter --out compare.md\n")
    add_decoding_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="an adapter to compare (repeatable); NAME defaults to the folder's name")
    parser.add_argument("--out", default=None, help="also write the table to this .md or .html file")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """'name=folder' or 'folder' (named after the folder) -> {name: folder}, names unique."""
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else (Path(spec).name or spec, spec)
        if name in found or name == "base":
            raise LorakitError(f"--adapter {spec!r}: the name {name!r} is taken; give it another with NAME=FOLDER")
        found[name] = folder
    return found


def to_markdown(prompts: list[str], columns: dict[str, list[str]]) -> str:
    """A markdown table: one row per prompt, one column per model."""
    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or " "
    lines = ["| prompt | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for i, prompt in enumerate(prompts):
        lines.append(f"| {cell(prompt)} | " + " | ".join(cell(col[i]) for col in columns.values()) + " |")
    return "\n".join(lines) + "\n"


def to_html(prompts: list[str], columns: dict[str, list[str]]) -> str:
    """A standalone HTML page with the same table."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in ["prompt", *columns])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(text.strip())}</td>"
                                    for text in [prompt, *(col[i] for col in columns.values())]) + "</tr>"
                   for i, prompt in enumerate(prompts))
    return ("<!doctype html><meta charset='utf-8'><title>lorakit compare</title><style>table{border-collapse:"
            "collapse}td,th{border:1px solid #999;padding:4px;vertical-align:top;white-space:pre-wrap}</style>"
            f"<table><tr>{head}</tr>{body}</table>\n")


def to_terminal(prompts: list[str], columns: dict[str, list[str]], width: int = 100) -> str:
    """Plain-text table with wrapped cells, columns sharing the terminal width."""
    names = ["prompt", *columns]
    col_width = max(12, (width - 3 * len(names)) // len(names))
    out = [" | ".join(name.ljust(col_width) for name in names), "-+-".join("-" * col_width for _ in names)]
    for i, prompt in enumerate(prompts):
        cells = [textwrap.wrap(t.strip(), col_width) or [""] for t in [prompt, *(c[i] for c in columns.values())]]
        for line in range(max(len(c) for c in cells)):
            out.append(" | ".join((c[line] if line < len(c) else "").ljust(col_width) for c in cells))
        out.append("-+-".join("-" * col_width for _ in names))
    return "\n".join(out)


def compare(model, tokenizer, prompts: list[str], adapters: dict[str, str], **generate_kwargs) -> dict[str, list[str]]:
    """{"base": answers, name: answers, ...}, all (prompt, model) pairs in one batch."""
    from lorakit.adapters.multi import add_adapter
    from lorakit.infer.generate import generate_texts

    for name, folder in adapters.items():
        add_adapter(model, name, folder)
    names = [None, *adapters]
    rows = [(prompt, name) for name in names for prompt in prompts]
    texts = generate_texts(model, tokenizer, [p for p, _ in rows], adapters=[n for _, n in rows], **generate_kwargs)
    return {name or "base": texts[i * len(prompts):(i + 1) * len(prompts)] for i, name in enumerate(names)}


def run(args: argparse.Namespace) -> int:
    """Generate, print the table, write the report."""
    prompts = read_prompts(args.prompts, args.prompts_file)
    adapters = parse_adapters(args.adapter)
    sampling = sampling_from_args(args)
    if args.out and Path(args.out).suffix not in (".md", ".html"):
        raise LorakitError(f"--out {args.out!r}: the report must end in .md or .html")
    model, tokenizer = load_base(args, next(iter(adapters.values()), None))
    columns = compare(model, tokenizer, prompts, adapters, sampling=sampling, max_new_tokens=args.max_new_tokens,
                      chat=args.chat, seed=args.seed)
    print(to_terminal(prompts, columns, shutil.get_terminal_size((120, 20)).columns))
    if args.out:
        render = to_html if args.out.endswith(".html") else to_markdown
        Path(args.out).write_text(render(prompts, columns), encoding="utf-8")
        print(f"report written to {args.out}")
    return 0
