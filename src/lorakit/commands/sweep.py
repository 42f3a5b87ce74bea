"""`lorakit sweep [CONFIG] [overrides]`: a grid of short trainings, a table and the sweep's figures.

The grid is ranks x learning rates x methods x target sets (methods without a rank, such as
full, get one cell per learning rate). Each cell is a run folder under --out; a cell that
finished (its cell.json exists) is skipped, so re-running the same command resumes the sweep.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands.configargs import add_config_arguments, config_from_args

ACCEPTS_EXTRA_ARGS = True

EXAMPLES = """\
examples:
  lorakit sweep --ranks 1,4,16,64 --lrs 1e-4,1e-3 --methods lora,full --general-data embedded-general
  lorakit sweep --target-sets attention,mlp,all-linear --ranks 16 --lrs 1e-3 --train.epochs 2
  lorakit sweep my.yaml --out runs/my-sweep --train.max_steps 50     # run again to resume
"""


def _list(cast):
    return lambda text: [cast(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Grid options, then the same config and overrides as `lorakit train` (the base of every cell)."""
    parser.description = __doc__.split("\n\n")[1]
    parser.epilog = EXAMPLES
    grid = parser.add_argument_group("grid")
    grid.add_argument("--ranks", type=_list(int), default=[4, 16], help="comma-separated LoRA ranks")
    grid.add_argument("--lrs", type=_list(float), default=[3e-4, 1e-3], help="comma-separated learning rates")
    grid.add_argument("--methods", type=_list(str), default=["lora"], help="comma-separated methods (lora, full, ...)")
    grid.add_argument("--target-sets", type=_list(str), default=["all-linear"],
                      help="comma-separated target sets: all-linear, attention, mlp")
    grid.add_argument("--alpha", type=float, default=None,
                      help="LoRA alpha for every rank (default: the config's); a fixed alpha with 1/r scaling "
                           "keeps the best lr nearly rank-independent (LoRA Without Regret)")
    grid.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep folder (one run folder per cell)")
    grid.add_argument("--general-data", default=None,
                      help="text (or prompt/completion) rows scored after training to measure forgetting, "
                           "e.g. embedded-general")
    grid.add_argument("--qa-data", default=None,
                      help="prompt/completion rows for held-out exact-match accuracy, e.g. embedded-eval")
    grid.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    add_config_arguments(parser)


def _rows(name: str | None) -> list[dict] | None:
    if name is None:
        return None
    from lorakit.infer.evaluate import read_rows
    from lorakit.models import dataset_path

    return read_rows(dataset_path(name))


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the grid, then write results.csv, results.md and the figures."""
    from lorakit.analysis.plots import write_outputs
    from lorakit.analysis.sweep import grid, run_sweep
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base, _ = config_from_args(args)
    cells = grid(args.methods, args.ranks, args.lrs, args.target_sets)
    print(f"sweep: {len(cells)} cells in {args.out}")
    rows = run_sweep(base, cells, args.out, alpha=args.alpha, general_rows=_rows(args.general_data),
                     qa_rows=_rows(args.qa_data))
    for name, path in write_outputs(rows, args.out).items():
        print(f"{name:<12} {path}")
    return 0
