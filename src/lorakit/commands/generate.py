"""`lorakit generate [RUN] [PROMPT ...]`: complete prompts with a base model, alone or with an adapter; streams.

A first word that names a folder is the run (or adapter, or model folder), as `--adapter` would be.

With an adapter that has a run record, prompts get the run's prompt format (infer/generate.py's rule)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit.commands.inputs import (add_decoding_arguments, add_model_arguments, load_run_model, prompt_format_of,
                                     read_prompts, sampling_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompts, model, adapter and decoding options."""
    parser.epilog = ("examples:\n  lorakit generate 'What is the capital of France?'\n"
                     "  lorakit generate runs/x 'What is the capital of Peru?'   # a folder first: the run\n"
                     "  lorakit generate --adapter runs/x/adapter 'What is the capital of Peru?'\n"
                     "  lorakit generate --adapter runs/x --prompts-file prompts.jsonl --temperature 0.7\n"
                     "  lorakit generate --adapter runs/flags/adapter --image flag.png 'Which country is this?'\n")
    add_decoding_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--adapter", default=None,
                        help="an adapter folder to load onto the base model (or a run folder, or a full fine-tuning "
                             "model folder)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for every prompt (repeatable), read by a modality adapter: its soft tokens "
                             "go where the prompt says <image>, else in front of it")


def run(args: argparse.Namespace) -> int:
    """Generate for every prompt in turn, printing the tokens as they come."""
    from lorakit.infer.generate import generate_texts

    if args.adapter is None and args.prompts and Path(args.prompts[0]).is_dir():  # `generate RUN "prompt"`
        args.adapter, args.prompts = args.prompts[0], args.prompts[1:]
        print(f"{args.adapter}: a folder, read as --adapter {args.adapter} (a run, adapter or model folder), "
              "not as a prompt", flush=True)
    prompts = read_prompts(args.prompts, args.prompts_file)
    sampling = sampling_from_args(args)
    model, tokenizer, target = load_run_model(args, args.adapter)
    prompt_format = prompt_format_of(args, target, tokenizer)
    for index, prompt in enumerate(prompts):
        print(f"### prompt {index + 1}: {prompt}", flush=True)
        generate_texts(model, tokenizer, [prompt], sampling=sampling, max_new_tokens=args.max_new_tokens,
                       prompt_format=prompt_format, seed=args.seed, on_text=lambda _row, piece: _write(piece),
                       images=[args.image] if args.image else None)
        print("\n", flush=True)
    return 0


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
