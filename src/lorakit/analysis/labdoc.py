"""`lorakit lab-report`: run the lab experiments on the embedded model and write docs/lab.md.

    lorakit lab-report --out docs --work runs/lab     # ~12 minutes on one CPU thread, resumable

Trains the cells of `lorakit.analysis.labrun.LAB_CELLS` (skipping completed ones), then writes
docs/lab.md and its figures. Every number and every "reproduced / not reproduced" verdict in
the page is computed here from the runs; nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

from lorakit.analysis import labclaims
from lorakit.analysis.plots import markdown_table, write_outputs

FIGURES = ("rank_curves", "lr_sweep", "target_sets", "forgetting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit lab-report`."""
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for lab.md and its figures")
    parser.add_argument("--work", type=Path, default=Path("runs/lab"), help="folder of the lab's run folders")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")


def _intruder_figures(rows: Sequence[dict], sweep_dir: Path, out: Path) -> dict[str, dict]:
    """Spectral comparison of the reference LoRA and full cells; writes intruders_<method>.png."""
    from lorakit.analysis.spectral import compare_state_dicts
    from lorakit.analysis.weights import load_pair
    from lorakit.commands.inspect import plot

    results = {}
    for label, row in labclaims.reference_cells(rows).items():
        base, tuned, names, _ = load_pair(sweep_dir / row["name"])
        spectra = compare_state_dicts(base, tuned, names)
        plot(spectra, out / f"intruders_{label}.png", f"{row['name']} vs the embedded base")
        results[label] = {"row": row, "spectra": spectra}
    return results


def write_lab(base: dict, rows: list[dict], work: Path, out: Path) -> Path:
    """docs/lab.md and its PNGs from the base scores and the sweep rows."""
    out.mkdir(parents=True, exist_ok=True)
    sweep_dir = work / "sweep"
    figures = write_outputs(rows, sweep_dir, base)
    for name in FIGURES:
        if name in figures:
            shutil.copyfile(figures[name], out / f"lab_{name}.png")
    spectra = _intruder_figures(rows, sweep_dir, out)
    sections = [labclaims.header(rows), labclaims.base_vs_sft(base, rows, sweep_dir),
                labclaims.rank_section(rows), labclaims.lr_section(rows), labclaims.targets_section(rows),
                labclaims.forgetting_section(base, rows), labclaims.intruder_section(spectra),
                "## All runs\n\n" + markdown_table(rows)]
    path = out / "lab.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> int:
    """Train what is missing, then write the page."""
    from lorakit.analysis.labrun import run_lab
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base, rows = run_lab(args.work)
    print(f"lab: {write_lab(base, rows, args.work, args.out)}")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m lorakit.analysis.labdoc")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
