"""`lorakit quickstart`: the offline demo (lab/quickstart.py): LoRA-tune the embedded model, base vs tuned;
with --dpo, DPO from that adapter next, SFT vs SFT + DPO."""
from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.lab.config import QUICKSTART_OUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit quickstart` (the defaults are the README's demo)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"run folder (default: {QUICKSTART_OUT}, or {QUICKSTART_OUT}-2, ... if taken)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training questions")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (short test runs)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and data order")
    parser.add_argument("--progress", default="auto", help="auto, bar, plain or none")
    parser.add_argument("--dpo", action="store_true",
                        help="then DPO from the SFT adapter on the embedded preference set (right answer chosen, a "
                             "plausible wrong one rejected) and compare SFT with SFT + DPO on held-out questions: "
                             "accuracy, margin, forgetting (the run configs/quickstart-dpo.yaml describes)")
    parser.add_argument("--dpo-epochs", type=int, default=1, help="DPO passes over the preference pairs")
    parser.add_argument("--dpo-steps", type=int, default=None, help="stop DPO after this many steps")
    parser.add_argument("--dpo-lr", type=float, default=1e-4, help="DPO peak learning rate")
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO beta (larger keeps closer to the SFT model)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (0: torch's default); the model is tiny, and on a "
                             "busy 2-core machine one thread trained ~5x faster than two")


def run(args: argparse.Namespace) -> int:
    """The `lorakit quickstart` command."""
    from lorakit.lab.quickstart import quickstart
    from lorakit.lab.report import terminal_report
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = quickstart(args)
    print(terminal_report(report))
    print(f"\n  whole command         {report['wall_time_s']:.0f} s")
    return 0
