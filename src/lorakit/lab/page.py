"""docs/lab.md: the lab's page and its figures, written from the runs of `lab.experiments`.

Every number and every "reproduced / not reproduced" verdict in the page is computed from the
runs (`lab.claims`); nothing is typed in by hand. `lorakit lab-report` (commands/lab_report.py)
trains what is missing, then calls `write_lab`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from lorakit.analysis.plots import markdown_table, spectra_figure, write_outputs
from lorakit.analysis.spectral import compare_state_dicts
from lorakit.analysis.weights import load_pair
from lorakit.lab import claims
from lorakit.lab.rl import RESULTS_FILE
from lorakit.lab.rl_page import FIGURE as RL_FIGURE, curves_figure, rl_section

FIGURES = ("rank_curves", "lr_sweep", "target_sets", "forgetting")


def _intruder_figures(rows: Sequence[dict], sweep_dir: Path, out: Path) -> dict[str, dict]:
    """Spectral comparison of the reference LoRA and full cells; writes intruders_<method>.png."""
    results = {}
    for label, row in claims.reference_cells(rows).items():
        base, tuned, names, _ = load_pair(sweep_dir / row["name"])
        spectra = compare_state_dicts(base, tuned, names)
        spectra_figure(spectra, out / f"intruders_{label}.png", f"{row['name']} vs the embedded base")
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
    sections = [claims.header(rows), claims.base_vs_sft(base, rows, sweep_dir),
                claims.rank_section(rows), claims.lr_section(rows), claims.targets_section(rows),
                claims.forgetting_section(base, rows), claims.intruder_section(spectra)]
    rl_results = work / "rl" / RESULTS_FILE  # `lorakit lab-rl`'s, when it has run
    if rl_results.is_file():
        results = json.loads(rl_results.read_text())
        curves_figure(results, out / RL_FIGURE)
        sections.append(rl_section(results))
    sections.append("## All runs\n\n" + markdown_table(rows))
    path = out / "lab.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
