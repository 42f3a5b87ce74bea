"""`lorakit lab-rl`: the lab's RL experiment (is LoRA rank 1 enough for GRPO?) and docs/lab.md's section (g).

    lorakit lab-rl --out docs --work runs/lab          # resumable; writes runs/lab/rl/results.json
    lorakit lab-rl --quick --out /tmp/lab --work /tmp/lab-work   # the same pipeline on tiny settings (seconds)

Trains the weak SFT start, the lr sweeps and the seeded finals of `lorakit.lab.rl` (skipping completed runs),
writes results.json, then puts section (g) and its figure into OUT/lab.md (`lorakit.lab.rl_page`).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit lab-rl`."""
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of lab.md (section (g) and its figure)")
    parser.add_argument("--work", type=Path, default=Path("runs/lab"),
                        help="the lab's work folder; the runs go to WORK/rl (WORK/rl-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: the pipeline end to end in seconds")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    """Run what is missing, write results.json and the page section."""
    from lorakit.lab.rl import FULL, QUICK, RESULTS_FILE, run_rl
    from lorakit.lab.rl_page import write_rl_section
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = args.work / ("rl-quick" if args.quick else "rl")
    results = run_rl(work, QUICK if args.quick else FULL)
    print(f"lab-rl: {work / RESULTS_FILE}; verdict: {results['verdict']}")
    print(f"lab-rl: {write_rl_section(args.out / 'lab.md', results)}")
    return 0
