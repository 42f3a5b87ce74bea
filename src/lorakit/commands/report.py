"""`lorakit report RUN_DIR`: one self-contained HTML page (config, loss curves, evaluation,
sample generations, trainable parameters) that opens offline in any browser."""
from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.errors import LorakitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit report`."""
    parser.add_argument("run_dir", type=Path, help="a run folder (lorakit train, quickstart or a sweep cell)")
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    """Write the page and print its path."""
    from lorakit.analysis.html_report import render

    if not (args.run_dir / "metrics.jsonl").is_file():
        raise LorakitError(f"{args.run_dir} is not a run folder: it has no metrics.jsonl")
    out = args.out or args.run_dir / "report.html"
    out.write_text(render(args.run_dir), encoding="utf-8")
    print(f"report: {out}")
    return 0
