"""The `lorakit` command: one entry point, subcommands looked up in a registry.

Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`. Only the chosen
command's module is imported, so `lorakit --help` is instant and a missing or broken command
cannot break the others. A `LorakitError` ends the command with `error: <message>` on stderr
and exit code 2 (no traceback); Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

from lorakit import __version__
from lorakit.errors import LorakitError

# name -> (module with add_arguments/run, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("lorakit.commands.quickstart", "the offline demo: LoRA-tune the embedded model, compare base vs tuned"),
    "train": ("lorakit.commands.train", "fine-tune a model from a YAML config plus dotted overrides"),
    "params": ("lorakit.commands.params", "apply a method to a model and print the trainable-parameter report"),
    "evaluate": ("lorakit.commands.evaluate", "exact-match accuracy and loss of a model (+ adapter) on a dataset"),
    "pretrain": ("lorakit.commands.pretrain", "pre-train the small embedded base model from scratch"),
    "calc": ("lorakit.commands.calc", "trainable parameters and training memory of each method, from a config"),
    "sweep": ("lorakit.commands.sweep", "a grid of short trainings: rank x lr x method x target set, with plots"),
    "inspect": ("lorakit.commands.inspect", "spectra of fine-tuned vs base weights: effective rank, intruder dimensions"),
    "report": ("lorakit.commands.report", "one self-contained HTML page for a run folder"),
    "lab-report": ("lorakit.commands.lab_report", "re-run the lab experiments on the embedded model, write docs/lab.md"),
    "lab-rl": ("lorakit.commands.lab_rl", "the lab's RL experiment: GRPO with LoRA r1, r8 and full; docs/lab.md's (g)"),
    "lab-vision": ("lorakit.commands.lab_vision", "the lab's image experiment: per-modality adapters on flags; docs/lab.md's (h)"),
    "generate": ("lorakit.commands.generate", "complete prompts with a model, alone or with an adapter (streams)"),
    "compare": ("lorakit.commands.compare", "the same prompts through the base and adapters, side by side"),
    "chat": ("lorakit.commands.chat", "talk to a model (+ adapter) turn by turn, in its trained prompt format"),
    "merge": ("lorakit.commands.merge", "fold an adapter into its base: a standalone transformers model folder"),
    "serve": ("lorakit.commands.serve", "an OpenAI-compatible HTTP server for a base model and its adapters"),
    "export": ("lorakit.commands.export", "a run, adapter or model as one GGUF file for llama.cpp, Ollama, LM Studio"),
    "push": ("lorakit.commands.push", "upload a run's adapter (or merged model) and a model card to the Hugging Face Hub"),
}


class CommandUnavailable(LorakitError):
    """A registered command whose module is not part of this installation."""


def load_command(name: str) -> ModuleType:
    """Import the module behind command `name` (its own absence is a clear error)."""
    module_path = COMMANDS[name][0]
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        # Only the command's own module (or its package) missing means "not available";
        # a missing third-party dependency inside it is a real bug and keeps its traceback.
        if exc.name and module_path.startswith(exc.name):
            raise CommandUnavailable(f"command '{name}' is not available: module {module_path} is missing") from None
        raise


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The first non-option word if it names a command (the only module that gets imported)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    """The top-level parser, with arguments only for the command named in `argv`."""
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Post-training for causal language models: LoRA and friends.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(argv)
    module = None
    for name, (_, summary) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            module = load_command(name)
            module.add_arguments(sub)
    return parser, module


def _dispatch(argv: list[str]) -> int:
    parser, module = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if module is None:
        parser.print_help(sys.stderr if args.command is None and argv else sys.stdout)
        return 0 if not argv else 2
    if extra:
        if not getattr(module, "ACCEPTS_EXTRA_ARGS", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra  # e.g. `train` turns an unknown --key into a closest-key error
    return int(module.run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lorakit` command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
