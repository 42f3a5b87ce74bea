"""`lorakit lab-rl`: the lab's RL experiment (is LoRA rank 1 enough for GRPO?) and docs/lab.md's section (g).

    lorakit lab-rl --out docs --work runs/lab          # resumable; writes runs/lab/rl/results.json
    lorakit lab-rl --quick --out /tmp/lab --work /tmp/lab-work   # the same pipeline on tiny settings (seconds)

Trains the weak SFT start, the lr sweeps and the seeded finals of `lorakit.lab.rl` (skipping completed runs),
writes results.json, then puts section (g) and its figure into OUT/lab.md (`lorakit.lab.rl_page`).
"""
from __future__ import annotations

import argparse

from lorakit.commands.labargs import add_lab_arguments, start_lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit lab-rl`."""
    add_lab_arguments(parser, "folder of lab.md (section (g) and its figure)",
                      "the lab's work folder; the runs go to WORK/rl (WORK/rl-quick with --quick)",
                      "tiny settings: the pipeline end to end in seconds")


def run(args: argparse.Namespace) -> int:
    """Run what is missing, write results.json and the page section."""
    from lorakit.lab.rl import FULL, QUICK, RESULTS_FILE, run_rl
    from lorakit.lab.rl_page import write_rl_section

    start_lab(args)
    work = args.work / ("rl-quick" if args.quick else "rl")
    results = run_rl(work, QUICK if args.quick else FULL)
    print(f"lab-rl: {work / RESULTS_FILE}; verdict: {results['verdict']}")
    print(f"lab-rl: {write_rl_section(args.out / 'lab.md', results)}")
    return 0
