"""What the inference commands share: reading prompts, finding an adapter's base, CLI options."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import DataError, LorakitError

if TYPE_CHECKING:
    from lorakit.infer.sampling import Sampling


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


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder names in adapter_config.json (base_model_name_or_path)."""
    config = Path(folder) / "adapter_config.json"
    try:
        name = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise LorakitError(f"cannot read {config}: {error}") from error
    if not name:
        raise LorakitError(f"{config} names no base_model_name_or_path; pass the base model with --model")
    return str(name)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype."""
    parser.add_argument("--model", default=None,
                        help="base model: 'embedded', a local folder or a hub id (default: the adapter's "
                             "base_model_name_or_path, else 'embedded')")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as saved)")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompt sources and every decoding option."""
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to complete")
    parser.add_argument("--prompts-file", default=None,
                        help="more prompts: a text file (one per line) or JSONL rows with a 'prompt' field")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages repeating tokens already in the text (1.0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (per prompt)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the chat template (default: when the tokenizer has one)")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The Sampling options given on the command line."""
    from lorakit.infer.sampling import Sampling

    if args.max_new_tokens < 1:
        raise LorakitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)


def load_base(args: argparse.Namespace, adapter: str | None = None):
    """(model, tokenizer) named by --model, or by the adapter's config, or the embedded model."""
    from lorakit.models import load_model, load_tokenizer, quiet_progress_bars

    quiet_progress_bars()
    name = args.model or (adapter_base(adapter) if adapter else "embedded")
    return load_model(name, dtype=args.dtype).eval(), load_tokenizer(name)
