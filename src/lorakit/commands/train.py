"""`lorakit train [CONFIG] [overrides]`: fine-tune a model and write a run folder."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from lorakit.commands.configargs import add_config_arguments, config_from_args

ACCEPTS_EXTRA_ARGS = True  # unknown --keys reach run() and become closest-key errors

EXAMPLES = """\
examples:
  lorakit train                                   # the embedded quickstart recipe
  lorakit train configs/bloomz-awesome-prompts.yaml --train.lr 3e-4 --method.r 8
  lorakit train my.yaml data.source=rows.jsonl method=full   # switch method, drop the file's method keys
  lorakit train runs/my --resume                  # continue a run from its latest checkpoint
  lorakit train runs/my --resume --train.epochs 3 # extend it (the lr schedule becomes a 3-epoch run's)
  lorakit train my.yaml --learning_rate 3e-4 --lora_r 8   # names from transformers/peft/TRL/axolotl work too
  lorakit train my.yaml --nproc 2                 # 2 processes on this machine (torchrun, DDP/FSDP2)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register CONFIG, --resume and one --section.key option per config field."""
    parser.description = textwrap.dedent("""\
        Fine-tune a causal LM from a YAML config. Every config field below can be overridden
        as --section.key VALUE or section.key=VALUE; lists and mappings take YAML text,
        e.g. --method.targets '[q_proj, v_proj]' or data.columns='{prompt: act}'.
        method=NAME (or --method NAME) switches the method and drops the file's method keys.
        The names transformers, peft, TRL, axolotl and torchtune use (learning_rate, num_train_epochs,
        per_device_train_batch_size, lora_r, lora_alpha, target_modules, max_seq_length, ...) are
        accepted as aliases, top-level or in their section, with a note naming lorakit's key.""")
    parser.epilog = EXAMPLES
    parser.add_argument("--resume", action="store_true",
                        help="continue the run folder's latest checkpoint, or start it again from step 0 when it "
                             "stopped before its first (the config must match the run's, except train.epochs "
                             "and train.max_steps: a longer or shorter run follows the lr schedule of its new "
                             "length from the resumed step on)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train with N processes on this machine: re-launches this command through torchrun "
                             "(DDP for adapters, FSDP2 for method full; one GPU per process, or gloo on CPU)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Train; print where the run folder and its report are."""
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun
        return relaunch(args.nproc)
    from lorakit.run import train_run  # the command boundary: torch-side rooms load here

    cfg, source = config_from_args(args)
    train_run(cfg, base=source.stem, source=source, resume=args.resume)
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` minus its --nproc option (both `--nproc N` and `--nproc=N`)."""
    kept, skip = [], False
    for word in argv:
        if skip or word.startswith("--nproc="):
            skip = False
            continue
        skip = word == "--nproc"
        kept += [] if skip else [word]
    return kept


def relaunch(nproc: int) -> int:
    """Run this same command in `nproc` processes under torchrun (its elastic agent, on this machine)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "lorakit", *without_nproc(sys.argv[1:])])
    except ChildFailedError:
        return 1  # the ranks printed their own errors
    return 0
