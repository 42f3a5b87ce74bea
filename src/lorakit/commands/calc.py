"""`lorakit calc MODEL [method.KEY=VALUE ...]`: trainable parameters and training memory, without weights.

MODEL is a built-in preset (Llama-3.2-1B, Llama-3.1-8B, 7B, bloomz-560m, SmolLM2-135M), a local
folder or a hub id (only its config.json is read), or 'embedded'. The method is a real method
config, built and checked as `lorakit train` builds it: `--method NAME` (any registered method, or
`all`), its fields as `method.KEY=VALUE` words or `--method.KEY VALUE` options, and/or the `method:`
section of a run config (`--config`). Unset fields keep the method's own defaults (LoRA r=8).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit import dtypes
from lorakit.adapters import METHODS
from lorakit.analysis.memory import (GB, OPTIMIZER_BYTES, PRECOMPUTED_BYTES_PER_PAIR, TrainingSetup, estimate,
                                    reference_bytes)
from lorakit.analysis.presets import PRESETS
from lorakit.analysis.shapes import ModelShape, shape_from_config
from lorakit.commands.configargs import _add_method_options, _check_duplicates, config_source, split_words
from lorakit.config import apply_overrides, build_config, default_schema, read_yaml
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.analysis.params import MethodCount

ACCEPTS_EXTRA_ARGS = True  # an unknown --method.key becomes the closest-key error of `lorakit train`

EXAMPLES = """\
examples:
  lorakit calc 7B --lecture                       # the lecture's exercises and the 7B memory claim
  lorakit calc Llama-3.2-1B method.r=16 --targets q_proj,v_proj
  lorakit calc Llama-3.1-8B --method dora --method.r 16 --method.targets attention
  lorakit calc ./my-model --method all --batch-sizes 1,8 --seq-lens 512,4096
  lorakit calc --config runs/my-run               # the run's model and method section
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit calc`: the model, the memory setup, then the method keys of `lorakit train`."""
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.usage = f"{parser.prog} [-h] [options] [MODEL] [method.KEY=VALUE ...]"
    parser.epilog = EXAMPLES
    parser.allow_abbrev = False  # `--method.t` must not silently mean `--method.targets`
    parser.set_defaults(overrides=[])
    parser.add_argument("model", nargs="?", help=f"preset ({', '.join(PRESETS)}), local folder, hub id or "
                                                 "'embedded' (default with --config: the run config's model)")
    parser.add_argument("words", nargs="*", metavar="method.KEY=VALUE", help="method fields, as in `lorakit train`")
    parser.add_argument("--config", metavar="RUN", help="a run config (file, run folder or recipe name): its "
                                                        "method section, and its model when MODEL is not given")
    parser.add_argument("--r", help="short for method.r")
    parser.add_argument("--targets", help="short for method.targets; comma-separated names (q_proj,v_proj), "
                                          "all-linear, attention or mlp")
    parser.add_argument("--virtual-tokens", help="short for method.num_virtual_tokens")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8], help="comma-separated micro-batch sizes")
    parser.add_argument("--seq-lens", type=_ints, default=[512, 2048], help="comma-separated sequence lengths")
    parser.add_argument("--weight-dtype", default="bf16", help=f"storage of the (frozen) weights: {dtypes.accepted()}")
    parser.add_argument("--trainable-dtype", default="fp32", help="adapter weights and their gradients")
    parser.add_argument("--activation-dtype", default="bf16", help="saved activations")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZER_BYTES),
                        help="adamw (fp32 m+v, 8 B/param), adamw-8bit (2 B/param), sgd (no state)")
    parser.add_argument("--master-weights", action="store_true",
                        help="add an fp32 master copy of 16-bit trainable weights (mixed-precision full FT)")
    parser.add_argument("--lecture", action="store_true", help="also print the lecture's numbers")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a hub model's own config code (only if you trust it)")
    _add_method_options(parser, default_schema())


def _is_word(model: str | None) -> bool:
    """MODEL is optional with --config: `lorakit calc --config RUN method.r=4` puts a key=value word there."""
    return bool(model) and "=" in model and not Path(model).exists()


def method_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The method keys of the command line, as (dotted key, value): options, shorthands, then words."""
    words, extra = [args.model] if _is_word(args.model) else [], getattr(args, "extra", [])
    unknown = [word for word in extra if word.startswith("-") and not word.startswith("--method.")]
    if unknown:
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)} (see `lorakit calc --help`)")
    config, pairs = split_words([*words, *args.words], extra, default_schema())
    if config is not None:
        raise ConfigError(f"unexpected argument {config!r}: calc takes MODEL, then method.KEY=VALUE words "
                          "(a run config goes with --config)")
    targets = args.targets if args.targets is None or "," not in args.targets else args.targets.split(",")
    short = [("method.r", args.r), ("method.targets", targets), ("method.num_virtual_tokens", args.virtual_tokens)]
    overrides = [*args.overrides, *((key, value) for key, value in short if value is not None), *pairs]
    _check_duplicates(overrides)
    overrides.sort(key=lambda pair: pair[0] != "method")  # the method first: picking it drops the file's keys only
    for key, _ in overrides:
        if key != "method" and not key.startswith("method."):
            raise ConfigError(f"calc reads method keys only (method.KEY=VALUE); got {key!r}")
    return overrides


def _built(section: Any) -> Any:
    """A method config from a raw `method:` section, through `lorakit.config.build_config`: the checks and
    the error messages of `lorakit train`."""
    return build_config({"method": section}).method


def method_configs(raw: dict, overrides: list[tuple[str, Any]]) -> list[Any]:
    """The method configs to count: the run config's method section with the overrides; for `--method all`,
    every registered method with the keys it has (as `--method NAME`, the run config's keys are dropped)."""
    if dict(overrides).get("method") != "all":
        return [_built(apply_overrides(raw, overrides).get("method"))]
    keys = [(key, value) for key, value in overrides if key != "method"]
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in METHODS.items()}
    for key, value in keys:  # a key no method has: the error `lorakit train` gives for it
        if not any(key.removeprefix("method.") in names for names in fields.values()):
            _built(apply_overrides({}, [(key, value)])["method"])
    return [_built(apply_overrides({"method": name}, [(key, value) for key, value in keys
                                                      if key.removeprefix("method.") in fields[name]])["method"])
            for name in METHODS]


def model_and_methods(args: argparse.Namespace) -> tuple[str, list[Any]]:
    """(MODEL, method configs) of the command line."""
    model = None if _is_word(args.model) else args.model
    raw = read_yaml(config_source(args.config)) if args.config else {}
    if model is None and args.config is None:
        raise ConfigError("calc needs a MODEL (a preset, a folder, a hub id or 'embedded') or --config RUN")
    model = model or (raw.get("model") or {}).get("name_or_path") or "embedded"
    return model, method_configs(raw, method_overrides(args))


def _fields(method: Any) -> str:
    """The fields that set a method's size, and every field changed from its default."""
    shown = []
    for index, f in enumerate(dataclasses.fields(method)):
        value = getattr(method, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if index == 0 or f.name == "targets" or value != default:
            shown.append(f"{f.name}={value}")
    return ", ".join(shown)


def params_table(count: MethodCount) -> str:
    """Trainable parameters per module group, and the total."""
    fields = _fields(count.method)
    lines = [f"trainable parameters ({count.method.name}{', ' + fields if fields else ''})",
             f"  {'module type':<24}{'trainable':>16}"]
    lines += [f"  {group:<24}{trained:>16,}" for group, trained in count.groups.items()]
    fewer = count.total / max(count.trainable, 1)
    lines.append(f"  {'total':<24}{count.trainable:>16,}  ({100 * count.trainable / count.total:.4f}% of "
                 f"{count.total:,}" + (f"; {fewer:,.0f}x fewer)" if fewer >= 1.5 else ")"))
    return "\n".join(lines)


def _setups(args: argparse.Namespace) -> list[TrainingSetup]:
    return [TrainingSetup(batch_size=batch, seq_len=seq, weight_dtype=args.weight_dtype,
                          trainable_dtype=args.trainable_dtype, activation_dtype=args.activation_dtype,
                          optimizer=args.optimizer, master_weights=args.master_weights)
            for batch in args.batch_sizes for seq in args.seq_lens]


def memory_table(shape: ModelShape, counts: list[MethodCount], args: argparse.Namespace) -> str:
    """GB per component for every method x batch size x sequence length, with and without checkpointing."""
    lines = [f"training memory estimate, GB (weights {args.weight_dtype}, trainable {args.trainable_dtype}, "
             f"activations {args.activation_dtype}, optimizer {args.optimizer}"
             + (" + fp32 master weights" if args.master_weights else "") + ")",
             f"  {'method':<14}{'batch':>6}{'seq':>6}{'weights':>9}{'grads':>8}{'optim':>8}"
             f"{'activ':>8}{'total':>8}{'activ ckpt':>12}{'total ckpt':>12}"]
    for count in counts:
        for setup in _setups(args):
            plain = estimate(shape, count, setup)
            ckpt = estimate(shape, count, dataclasses.replace(setup, gradient_checkpointing=True))
            lines.append(f"  {count.method.name:<14}{setup.batch_size:>6}{setup.seq_len:>6}{plain.weights / GB:>9.2f}"
                         f"{plain.gradients / GB:>8.2f}{plain.optimizer / GB:>8.2f}{plain.activations / GB:>8.2f}"
                         f"{plain.total / GB:>8.2f}{ckpt.activations / GB:>12.2f}{ckpt.total / GB:>12.2f}")
    lines.append("  (framework overhead, e.g. the CUDA context and allocator fragmentation, is not included)")
    return "\n".join(lines)


def reference_table(counts: list[MethodCount], args: argparse.Namespace) -> str:
    """GB a preference run's reference model adds (train.objective dpo or ipo), per train.reference choice."""
    setup = _setups(args)[0]
    lines = ["preference tuning (train.objective dpo or ipo): the reference model's memory, GB (train.reference)",
             f"  {'method':<14}{'adapters_off':>14}{'copy':>10}{'precomputed':>13}"]
    for count in counts:
        extra = reference_bytes(count, setup)
        cells = ["n/a" if extra[kind] is None else f"{extra[kind] / GB:.2f}"
                 for kind in ("adapters_off", "copy", "precomputed")]
        lines.append(f"  {count.method.name:<14}{cells[0]:>14}{cells[1]:>10}{cells[2]:>13}")
    lines += ["  (auto: adapters_off for an adapter trained from scratch; copy for full fine-tuning and for an adapter "
              "started from model.init_adapter, whose copy is the adapter's size; precomputed: one reference pass "
              f"before training and {PRECOMPUTED_BYTES_PER_PAIR} bytes of host memory per pair; a micro-batch of B "
              "pairs holds 2B rows: read the table above at batch 2B)"]
    return "\n".join(lines)


def header(model: str, config: Any, total: int) -> str:
    """One line about the model: its architecture, sizes and parameter count."""
    layers, hidden, vocab = (getattr(config, key, None) for key in ("num_hidden_layers", "hidden_size", "vocab_size"))
    return (f"model: {model} ({config.model_type}, {layers} layers, hidden {hidden}, "
            f"vocab {vocab if vocab is None else format(vocab, ',')}): {total:,} parameters")


def run(args: argparse.Namespace) -> int:
    """Print the parameter tables, the memory table and, with --lecture, the lecture's numbers."""
    from lorakit.analysis.lecture import lecture_text  # the command boundary: torch-side rooms load here
    from lorakit.analysis.params import method_count
    from lorakit.analysis.targets import model_config

    model, methods = model_and_methods(args)
    config = model_config(model, args.trust_remote_code)
    counts = [method_count(config, method, args.trust_remote_code) for method in methods]
    print(header(model, config, counts[0].total) + "\n")
    for count in counts:
        print(params_table(count) + "\n")
    try:
        shape = shape_from_config(config)
    except ConfigError as error:  # an architecture the memory model has no sizes for: the counts still hold
        print(f"training memory estimate: none ({error})")
    else:
        print(memory_table(shape, counts, args))
    print("\n" + reference_table(counts, args))
    if args.lecture:
        print("\n" + lecture_text())
    return 0
