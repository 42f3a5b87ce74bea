"""`lorakit lab-report`: run the lab experiments on the embedded model and write docs/lab.md.

    lorakit lab-report --out docs --work runs/lab     # ~12 minutes on one CPU thread, resumable

Trains the cells of `lorakit.lab.experiments.LAB_CELLS` (skipping completed ones), then writes
docs/lab.md and its figures (`lorakit.lab.page`).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit lab-report`."""
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for lab.md and its figures")
    parser.add_argument("--work", type=Path, default=Path("runs/lab"), help="folder of the lab's run folders")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    """Train what is missing, then write the page."""
    from lorakit.lab.experiments import run_lab
    from lorakit.lab.page import write_lab
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base, rows = run_lab(args.work)
    print(f"lab: {write_lab(base, rows, args.work, args.out)}")
    return 0
