"""What the inference commands share: reading prompts, loading the base and adapter, the prompt-format flags.

The rule itself (which base, which prompt format) is infer/generate.py's `resolve_target` and
`prompt_rule`; here it meets the command line and every choice it makes is printed once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit import dtypes
from lorakit.data.prompting import adapter_config_base as adapter_base
from lorakit.errors import DataError, LorakitError

__all__ = ["adapter_base", "add_decoding_arguments", "add_format_arguments", "add_model_arguments",
           "add_sampling_arguments", "load_run_model", "prompt_format_of", "read_prompts", "sampling_from_args"]

if TYPE_CHECKING:
    from lorakit.data.prompting import PromptFormat
    from lorakit.infer.generate import Target
    from lorakit.decoding.sampling import Sampling


def read_prompts(prompts: list[str], path: str | None, field: str = "prompt") -> list[str]:
    """Prompts from the command line plus a file: JSONL rows with `field`, or one prompt a line."""
    found = list(prompts)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"prompts file {path!r} not found")
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if file.suffix == ".jsonl":
            found += [_jsonl_prompt(line, number, file, field) for number, line in enumerate(lines, 1)]
        else:
            found += lines
    if not found:
        raise DataError("no prompts: give them as arguments or with --prompts-file")
    return found


def _jsonl_prompt(line: str, number: int, file: Path, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{file} line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(row, dict) or not isinstance(row.get(field), str):
        raise DataError(f"{file} line {number}: no string field {field!r}")
    return row[field]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype."""
    parser.add_argument("--model", default=None,
                        help="base model: 'embedded', a local folder or a hub id (default: the base recorded with "
                             "the adapter, else its adapter_config.json, else 'embedded')")
    parser.add_argument("--dtype", default=None, help=f"{dtypes.accepted()} (default: as saved)")


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """--raw / --chat: how prompts become tokens when not as the run recorded (infer/generate.py's rule)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--raw", action="store_true",
                       help="send prompts as typed, without the prompt format recorded with the adapter")
    group.add_argument("--chat", action="store_true",
                       help="wrap prompts in the chat template: the tokenizer's, or lorakit's built-in one when it "
                            "has none (default: the adapter's recorded format; as typed without one)")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompt sources, the prompt-format flags and every decoding option."""
    parser.add_argument("prompts", nargs="*", metavar="PROMPT",
                        help="prompts to complete (generate: a first word that names a folder is the run, as --adapter)")
    parser.add_argument("--prompts-file", default=None,
                        help="more prompts: a text file (one per line) or JSONL rows with a 'prompt' field")
    add_sampling_arguments(parser)
    add_format_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Length, temperature, top-k/p, repetition penalty and seed."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages repeating tokens already in the text (1.0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (per prompt)")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The Sampling options given on the command line."""
    from lorakit.decoding.sampling import Sampling

    if args.max_new_tokens < 1:
        raise LorakitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)


def load_run_model(args: argparse.Namespace, adapter: str | None, *, attach: bool = True) -> tuple[Any, Any, Target]:
    """(model with `adapter` on it, tokenizer, target): the base from --model, else the adapter's record or
    adapter_config.json, else the embedded model; prints the choices made and a mismatched base's warning.
    `attach=False` loads the base only (the caller adds the adapter by name and checks its base itself)."""
    from lorakit.infer.generate import load_target, resolve_target

    target = resolve_target(adapter, args.model)
    if not attach:
        target = dataclasses.replace(target, adapter=None, record=None, source=None)
    model, tokenizer = load_target(target, dtype=args.dtype, log=_say)
    return model, tokenizer, target


def prompt_format_of(args: argparse.Namespace, target: Target | None, tokenizer: Any, *, record: Any = None,
                     source: str | None = None, prefix: str = "") -> PromptFormat | None:
    """The prompt format for `target` (or for `record` of the folder `source`) under --raw/--chat; prints which."""
    from lorakit.infer.generate import prompt_rule

    prompt_format, line = prompt_rule(target if target is not None else record, tokenizer, raw=args.raw,
                                      chat=args.chat, source=source)
    _say(prefix + line)
    return prompt_format


def _say(line: str) -> None:
    print(line, flush=True)
