"""The options and start-up every lab command shares (`lab-report`, `lab-rl`, `lab-vision`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_lab_arguments(parser: argparse.ArgumentParser, out_help: str, work_help: str, quick_help: str) -> None:
    """--out, --work, --quick and --threads, with each command's own help text."""
    parser.add_argument("--out", type=Path, default=Path("docs"), help=out_help)
    parser.add_argument("--work", type=Path, default=Path("runs/lab"), help=work_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")


def start_lab(args: argparse.Namespace) -> None:
    """Quiet the hub's progress bars and pin torch's threads (a lab's runs are timed and seeded on one thread)."""
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
