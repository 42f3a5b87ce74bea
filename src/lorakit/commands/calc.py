"""`lorakit calc MODEL`: trainable parameters and training memory of each method, without weights.

MODEL is a built-in preset (Llama-3.2-1B, Llama-3.1-8B, 7B, bloomz-560m, SmolLM2-135M), a local
folder or a hub id (only its config.json is read), or 'embedded'.
"""
from __future__ import annotations

import argparse

from lorakit.analysis.memory import GB, OPTIMIZER_BYTES, TrainingSetup, estimate
from lorakit.analysis.params import PARAM_FORMULAS, MethodSpec, trainable_by_module
from lorakit.analysis.presets import PRESETS, preset_config
from lorakit.analysis.shapes import ModelShape, shape_from_config

EXAMPLES = """\
examples:
  lorakit calc 7B --lecture                       # the lecture's exercises and the 7B memory claim
  lorakit calc Llama-3.2-1B --method lora --r 16 --targets q_proj,v_proj
  lorakit calc ./my-model --method all --batch-sizes 1,8 --seq-lens 512,4096
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit calc`."""
    parser.epilog = EXAMPLES
    parser.add_argument("model", help=f"preset ({', '.join(PRESETS)}), local folder, hub id or 'embedded'")
    parser.add_argument("--method", default="lora", choices=[*PARAM_FORMULAS, "all"],
                        help="method to count; 'all' compares every method in the memory table")
    parser.add_argument("--r", type=int, default=16, help="LoRA / QLoRA / DoRA rank")
    parser.add_argument("--targets", default="all-linear",
                        help="all-linear, attention, mlp, or comma-separated module names (q_proj,v_proj)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="prompt tuning: virtual tokens")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8], help="comma-separated micro-batch sizes")
    parser.add_argument("--seq-lens", type=_ints, default=[512, 2048], help="comma-separated sequence lengths")
    parser.add_argument("--weight-dtype", default="bf16", help="storage of the (frozen) weights: bf16, fp16, fp32")
    parser.add_argument("--trainable-dtype", default="fp32", help="adapter weights and their gradients")
    parser.add_argument("--activation-dtype", default="bf16", help="saved activations")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZER_BYTES),
                        help="adamw (fp32 m+v, 8 B/param), adamw-8bit (2 B/param), sgd (no state)")
    parser.add_argument("--master-weights", action="store_true",
                        help="add an fp32 master copy of 16-bit trainable weights (mixed-precision full FT)")
    parser.add_argument("--lecture", action="store_true", help="also print the lecture's numbers")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a hub model's own config code (only if you trust it)")


def load_shape(model: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a preset, or of a model's config.json (no weights are read)."""
    preset = preset_config(model)
    if preset is not None:
        return shape_from_config(preset)
    from transformers import AutoConfig

    from lorakit.models import resolve

    path, local_only = resolve(model)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        from lorakit.errors import ConfigError

        raise ConfigError(f"cannot read the config of {model!r} (not a preset: {', '.join(PRESETS)}): "
                          f"{str(error).splitlines()[0]}") from error
    return shape_from_config(config)


def spec_of(args: argparse.Namespace, method: str) -> MethodSpec:
    """The MethodSpec of the command line for one method."""
    targets = args.targets if args.targets in ("all-linear", "attention", "mlp") else args.targets.split(",")
    return MethodSpec(method, r=args.r, targets=targets, num_virtual_tokens=args.virtual_tokens)


def params_table(shape: ModelShape, spec: MethodSpec) -> str:
    """Trainable parameters per module type, and the total."""
    groups = trainable_by_module(shape, spec)
    total = sum(groups.values())
    lines = [f"trainable parameters ({spec.name}"
             + (f", r={spec.r}, targets={spec.targets}" if spec.name in ("lora", "qlora", "dora") else "") + ")",
             f"  {'module type':<24}{'trainable':>16}"]
    lines += [f"  {group:<24}{count:>16,}" for group, count in groups.items()]
    lines.append(f"  {'total':<24}{total:>16,}  ({100 * total / shape.total_params:.4f}% of "
                 f"{shape.total_params:,}; {shape.total_params / max(total, 1):,.0f}x fewer)")
    return "\n".join(lines)


def memory_table(shape: ModelShape, specs: list[MethodSpec], args: argparse.Namespace) -> str:
    """GB per component for every method x batch size x sequence length, with and without checkpointing."""
    lines = [f"training memory estimate, GB (weights {args.weight_dtype}, trainable {args.trainable_dtype}, "
             f"activations {args.activation_dtype}, optimizer {args.optimizer}"
             + (" + fp32 master weights" if args.master_weights else "") + ")",
             f"  {'method':<14}{'batch':>6}{'seq':>6}{'weights':>9}{'grads':>8}{'optim':>8}"
             f"{'activ':>8}{'total':>8}{'activ ckpt':>12}{'total ckpt':>12}"]
    for spec in specs:
        for batch in args.batch_sizes:
            for seq in args.seq_lens:
                setup = TrainingSetup(batch_size=batch, seq_len=seq, weight_dtype=args.weight_dtype,
                                      trainable_dtype=args.trainable_dtype, activation_dtype=args.activation_dtype,
                                      optimizer=args.optimizer, master_weights=args.master_weights)
                plain = estimate(shape, spec, setup)
                ckpt = estimate(shape, spec, TrainingSetup(**{**setup.__dict__, "gradient_checkpointing": True}))
                lines.append(f"  {spec.name:<14}{batch:>6}{seq:>6}{plain.weights / GB:>9.2f}"
                             f"{plain.gradients / GB:>8.2f}{plain.optimizer / GB:>8.2f}{plain.activations / GB:>8.2f}"
                             f"{plain.total / GB:>8.2f}{ckpt.activations / GB:>12.2f}{ckpt.total / GB:>12.2f}")
    lines.append("  (framework overhead, e.g. the CUDA context and allocator fragmentation, is not included)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the parameter table, the memory table and, with --lecture, the lecture's numbers."""
    shape = load_shape(args.model, args.trust_remote_code)
    methods = list(PARAM_FORMULAS) if args.method == "all" else [args.method]
    specs = [spec_of(args, method) for method in methods]
    print(f"model: {args.model} ({shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
          f"vocab {shape.vocab_size:,}): {shape.total_params:,} parameters\n")
    for spec in specs:
        print(params_table(shape, spec) + "\n")
    print(memory_table(shape, specs, args))
    if args.lecture:
        from lorakit.analysis.lecture import lecture_text

        print("\n" + lecture_text())
    return 0
