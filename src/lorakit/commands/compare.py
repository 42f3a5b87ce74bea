"""`lorakit compare PROMPT... --adapter A --adapter B`: base and adapters side by side, one batch.

Every (prompt, model) pair is a row of one batch through the per-row multi-adapter path, so the
base model is loaded once and nothing is merged. Greedy by default; with --temperature every row
samples from its own generator seeded by --seed, so a report is reproducible.
"""
from __future__ import annotations

import argparse
import shutil
import textwrap
from pathlib import Path

from lorakit.analysis.html_page import esc, page, text_cell
from lorakit.commands.inputs import (add_decoding_arguments, add_model_arguments, load_run_model, prompt_format_of,
                                     read_prompts, sampling_from_args)
from lorakit.data.prompting import PromptFormat, output_folder, read_record, run_name
from lorakit.errors import LorakitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompts, adapters, decoding options and the report file."""
    parser.epilog = ("example:\n  lorakit compare 'What is the capital of Peru?' --adapter runs/a/adapter "
                     "--adapter tuned=runs/b/adapter --out compare.md\n")
    add_decoding_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="an adapter (or run) folder to compare (repeatable); NAME defaults to its run folder's name "
                             "(runs/a/adapter -> a)")
    parser.add_argument("--out", default=None, help="also write the table to this .md or .html file")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """'name=folder' or 'folder' -> {name: adapter folder}, names unique. Without a name an adapter is named
    after its run folder (runs/a/adapter -> a, runs/a -> a); a run folder stands for its adapter/ folder."""
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = run_name(spec), spec
        if name in found or name in ("base", "none"):
            taken = f"by {found[name]}" if name in found else "for the base model"
            raise LorakitError(f"--adapter {spec!r}: the name {name!r} is taken {taken}; name it with "
                               f"--adapter NAME={spec}")
        found[name] = str(output_folder(folder))
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
    """A standalone HTML page with the same table: columns of equal width, each answer wrapped (anywhere, so a
    long repeated token too) and scrolling inside its cell past a maximum height (analysis/html_page.py)."""
    head = "".join(f"<th>{esc(name)}</th>" for name in ["prompt", *columns])
    body = "".join("<tr>" + "".join(text_cell(text.strip()) for text in [prompt, *(col[i] for col in columns.values())])
                   + "</tr>" for i, prompt in enumerate(prompts))
    models = ", ".join(columns)
    return page("lorakit compare", f'<table class="wide"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>',
                subtitle=esc(f"{len(prompts)} prompt{'s' * (len(prompts) != 1)}, answered by {models}"))


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


def compare(model, tokenizer, prompts: list[str], adapters: dict[str, str], *,
            formats: dict[str, PromptFormat | None] | None = None, **generate_kwargs) -> dict[str, list[str]]:
    """{"base": answers, name: answers, ...}, all (prompt, model) pairs in one batch; `formats` gives each
    column ("base" or an adapter's name) its prompt format (default: the generate_kwargs' rule for all)."""
    from lorakit.adapters.multi import add_adapter
    from lorakit.infer.generate import generate_texts

    for name, folder in adapters.items():
        add_adapter(model, name, folder)
    names = [None, *adapters]
    rows = [(prompt, name) for name in names for prompt in prompts]
    if formats is not None:
        generate_kwargs["prompt_format"] = [formats.get(name or "base") for _, name in rows]
    texts = generate_texts(model, tokenizer, [p for p, _ in rows], adapters=[n for _, n in rows], **generate_kwargs)
    return {name or "base": texts[i * len(prompts):(i + 1) * len(prompts)] for i, name in enumerate(names)}


def column_formats(args: argparse.Namespace, adapters: dict[str, str], base: str, tokenizer) -> dict:
    """{column: prompt format}: each adapter its own recorded one, the base column the first adapter's; prints
    each choice, and a warning for an adapter trained on another base than `base`."""
    from lorakit.infer.generate import Target, base_warning

    formats: dict = {}
    for name, folder in adapters.items():
        record = read_record(folder)
        if warning := base_warning(Target(base, adapter=Path(folder)), record):
            print(f"{name}: {warning}")
        formats[name] = prompt_format_of(args, None, tokenizer, record=record, source=folder, prefix=f"{name}: ")
    if adapters:
        first = next(iter(adapters))
        formats["base"] = formats[first]
        print(f"base: the prompt format of {first} (the first adapter), so the columns see the same prompts")
    else:
        formats["base"] = prompt_format_of(args, None, tokenizer, prefix="base: ")
    return formats


def run(args: argparse.Namespace) -> int:
    """Generate, print the table, write the report."""
    prompts = read_prompts(args.prompts, args.prompts_file)
    adapters = parse_adapters(args.adapter)
    sampling = sampling_from_args(args)
    if args.out and Path(args.out).suffix not in (".md", ".html"):
        raise LorakitError(f"--out {args.out!r}: the report must end in .md or .html")
    model, tokenizer, target = load_run_model(args, next(iter(adapters.values()), None), attach=False)
    formats = column_formats(args, adapters, target.model, tokenizer)
    columns = compare(model, tokenizer, prompts, adapters, formats=formats, sampling=sampling,
                      max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(to_terminal(prompts, columns, shutil.get_terminal_size((120, 20)).columns))
    if args.out:
        render = to_html if args.out.endswith(".html") else to_markdown
        Path(args.out).write_text(render(prompts, columns), encoding="utf-8")
        print(f"report written to {args.out}")
    return 0
