"""`lorakit merge ADAPTER OUT`: fold an adapter into its base model and save a standalone model folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from lorakit import dtypes
from lorakit.commands.inputs import adapter_base
from lorakit.errors import LorakitError
from lorakit.permissions import share_tree


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ADAPTER, OUT and the base model."""
    parser.epilog = "example:\n  lorakit merge runs/x/adapter merged/\n"
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", help="output folder for the merged model (must be empty or absent)")
    parser.add_argument("--model", default=None,
                        help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default=None, help=f"load (and save) the base in this dtype: {dtypes.accepted()}")


def merge_to_folder(adapter: str | Path, out: str | Path, model_name: str | None = None,
                    dtype: str | None = None) -> Path:
    """Load base + adapter, merge, and save safetensors + config (+ tokenizer) that plain transformers loads."""
    from lorakit.adapters import load_adapter, merge
    from lorakit.models import load_model, load_tokenizer, quiet_progress_bars

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LorakitError(f"output folder {str(out)!r} is not empty; pick a new folder")
    quiet_progress_bars()
    name = model_name or adapter_base(adapter)
    model = merge(load_adapter(load_model(name, dtype=dtype), adapter))
    model.config.architectures = [type(model).__name__]  # the base class: no lorakit needed to load it
    model.save_pretrained(out)
    try:
        tokenizer = load_tokenizer(name)
    except LorakitError as error:
        print(f"note: no tokenizer saved ({error})")
    else:
        tokenizer.save_pretrained(out)
    share_tree(out)  # safetensors writes 0600: the user's umask instead
    return out


def run(args: argparse.Namespace) -> int:
    """Merge and report where the model went."""
    out = merge_to_folder(args.adapter, args.out, args.model, args.dtype)
    print(f"merged model saved to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0
