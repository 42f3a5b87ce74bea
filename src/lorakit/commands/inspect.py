"""`lorakit inspect ADAPTER_OR_MODEL [--base BASE]`: spectra of fine-tuned vs base weights, per module.

For every linear layer: the relative size of the update dW, the effective rank of dW (Roy &
Vetterli) and the intruder dimensions of the fine-tuned matrix (Shuttleworth et al. 2024), as a
table and a PNG (singular values of dW; intruders per layer). The PNG and the table (spectra.png, spectra.json)
go into TARGET by default, where `lorakit report` finds them.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from lorakit.analysis.spectral import ModuleSpectrum


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit inspect`."""
    parser.add_argument("target", help="adapter folder, full model folder, or a run folder of `lorakit train`")
    parser.add_argument("--base", default=None, help="base model (default: the one the adapter or run names)")
    parser.add_argument("--top-k", type=int, default=10, help="top singular vectors checked for intruders")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="an intruder's highest |cos| with any base singular vector is below this")
    parser.add_argument("--png", type=Path, default=None, help="figure path (default: TARGET/spectra.png)")
    parser.add_argument("--table", type=Path, default=None,
                        help="the printed table as JSON, one row per module (default: TARGET/spectra.json)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every number (all singular values, each intruder) to this JSON file")


def table(spectra: Sequence[ModuleSpectrum]) -> str:
    """One line per module, then the totals."""
    from lorakit.analysis.spectral import summary_rows

    lines = [f"{'module':<40}{'shape':>12}{'|dW|/|W|':>10}{'eff. rank dW':>14}{'top s(dW)':>11}{'intruders':>10}"]
    for row in summary_rows(list(spectra)):
        lines.append(f"{row['module']:<40}{row['shape']:>12}{row['relative_change']:>10.4f}"
                     f"{row['effective_rank']:>14.2f}{row['top_singular_value']:>11.4f}{row['intruders']:>10}")
    total = sum(len(m.intruders) for m in spectra)
    mean_rank = sum(m.effective_rank for m in spectra) / max(len(spectra), 1)
    lines.append(f"{len(spectra)} modules: {total} intruder dimensions in all, mean effective rank of dW "
                 f"{mean_rank:.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load both weight sets, compare every linear layer, print the table, write the PNG."""
    from lorakit.analysis.plots import spectra_figure
    from lorakit.analysis.spectral import SPECTRA_FIGURE, SPECTRA_TABLE, compare_state_dicts, summary_rows
    from lorakit.analysis.weights import load_pair
    from lorakit.models import quiet_progress_bars

    quiet_progress_bars()
    base, tuned, names, base_name = load_pair(args.target, args.base)
    spectra = compare_state_dicts(base, tuned, names, args.top_k, args.threshold)
    print(f"{args.target} vs base {base_name}  (intruders: top {args.top_k}, |cos| < {args.threshold})")
    print(table(spectra))
    png = args.png or Path(args.target) / SPECTRA_FIGURE
    print(f"figure: {spectra_figure(spectra, png, f'{Path(args.target).name} vs {base_name}')}")
    rows = args.table or Path(args.target) / SPECTRA_TABLE
    settings = {"base": base_name, "top_k": args.top_k, "threshold": args.threshold}
    rows.write_text(json.dumps({**settings, "modules": summary_rows(spectra)}, indent=1) + "\n")
    print(f"table: {rows}")
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in spectra], indent=1) + "\n")
    return 0
