"""`lorakit export RUN_OR_ADAPTER --format gguf`: one GGUF file for llama.cpp, Ollama and LM Studio."""
from __future__ import annotations

import argparse

from lorakit.export.writer import QUANT_TYPES  # numpy only: --help imports no torch

FORMATS = ("gguf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """SOURCE, --format, --quant, --out, --base, --adapter-only."""
    parser.epilog = ("examples:\n  lorakit export runs/quickstart --format gguf --quant q8_0\n"
                     "  lorakit export runs/quickstart/adapter --format gguf --out tuned-f16.gguf --quant f16\n"
                     "  lorakit export embedded --format gguf            # a model alone, no adapter\n"
                     "  lorakit export runs/quickstart --format gguf --adapter-only   # a GGUF LoRA for llama.cpp's --lora\n"
                     "architectures: LlamaForCausalLM (the embedded model, Llama 2/3, SmolLM, TinyLlama, ...)\n")
    parser.add_argument("source", metavar="RUN_OR_ADAPTER",
                        help="a run folder, an adapter folder, a model folder, or a model name ('embedded', a hub id)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="the file format (gguf)")
    parser.add_argument("--quant", choices=QUANT_TYPES, default="f32",
                        help="tensor type of the matrices (norms stay f32): f32 (exact), f16, bf16 or q8_0 (8-bit)")
    parser.add_argument("--out", default=None, help="the file to write (default: <name>-<quant>.gguf here)")
    parser.add_argument("--base", "--model", dest="base", default=None,
                        help="base model for the adapter (default: the base recorded with it)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the LoRA adapter alone as a GGUF LoRA (llama.cpp's --lora) instead of a merged model")


def run(args: argparse.Namespace) -> int:
    """Export and say where the file went and how to run it."""
    from lorakit.export import export_gguf, export_lora_gguf

    if args.adapter_only:
        out = export_lora_gguf(args.source, args.out, quant=args.quant, base=args.base)
        print(f"GGUF LoRA adapter written to {out} (llama.cpp: llama-cli -m BASE.gguf --lora {out})")
    else:
        out = export_gguf(args.source, args.out, quant=args.quant, base=args.base)
        print(f"GGUF model written to {out} (llama.cpp: llama-cli -m {out}; Ollama: FROM {out} in a Modelfile)")
    return 0
