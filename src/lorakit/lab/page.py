"""docs/lab.md: the lab's one page and its figures, written from the runs of `lab.experiments` (and lab/rl.py's).

Every number and every verdict in the page is computed from the runs (`lab.claims`, `lab.forgetting`); nothing is
typed in by hand. `lorakit lab-report` (commands/lab_report.py) trains what is missing, then calls `write_lab`,
which writes sections (a)-(f), (i) and (j), section (g) from lab-rl's results when given, and keeps every other lettered
section an earlier lab.md holds (e.g. (h), written by its own experiment into the same page), in letter order, before
"## All runs".
"""
from __future__ import annotations

import json

import re
from pathlib import Path

import numpy as np

from lorakit.lab import capacity, claims, forgetting, more
from lorakit.lab.figures import write_figures
from lorakit.lab.rl_page import FIGURE as RL_FIGURE, curves_figure, rl_section

ALL_RUNS = "## All runs"
_LETTER = re.compile(r"^## \((\w)\)")
REGENERATED = "abcdefij"  # the sections write_lab writes ((i), (j) when the results hold their runs)


def lettered_sections(text: str) -> dict[str, str]:
    """{letter: the section's text, heading included} of every '## (x) ...' section of a page."""
    found = {}
    for chunk in re.split(r"\n(?=## )", text):
        match = _LETTER.match(chunk)
        if match:
            found[match.group(1)] = chunk.strip("\n")
    return found


def runs_table(results: dict) -> str:
    """Every run of the lab: arm, seed, lr and its scores."""
    lines = ["| arm | run | seed | lr | steps | trainable params | final train loss | validation QA loss | "
             "test QA loss | test exact match | general-text loss |", "|---|---|" + "---:|" * 9]
    for name, arm in results["arms"].items():
        for run in arm["grid"] + arm["finals"]:
            lines.append(f"| {name} | {run['name']} | {run['seed']} | {run['lr']:.3g} | {run['steps']} | "
                         f"{run['trainable_params']:,} | {run['final_train_loss']:.4f} | "
                         f"{run['validation_loss']:.4f} | "
                         f"{np.mean(run['losses']['test']):.4f} | {claims.pct(np.mean(run['correct']['test']))} | "
                         f"{np.mean(run['losses']['general']):.4f} |")
    return "\n".join(lines)


RESULTS_COPY = "lab_results.json"


def write_lab(results: dict, work: Path, out: Path, rl_results: dict | None = None) -> Path:
    """docs/lab.md and its PNGs in `out`; `rl_results`: lab-rl's results.json, for section (g)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lab.md"
    kept = lettered_sections(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_figures(results, Path(work), out)
    sections = {"": claims.header(results), "a": claims.base_vs_sft(results), "b": claims.rank_section(results),
                "c": claims.lr_section(results), "d": claims.targets_section(results),
                "e": forgetting.forgetting_section(results), "f": forgetting.intruder_section(results)}
    if more.has_more(results):
        sections["i"] = more.more_section(results)
    if results.get("capacity"):
        capacity.capacity_figure(results["capacity"], Path(work), out / capacity.FIGURE)
        sections["j"] = capacity.capacity_section(results["capacity"], results["settings"]["bootstrap"])
    if rl_results is not None:
        curves_figure(rl_results, out / RL_FIGURE)
        sections["g"] = rl_section(rl_results)
    for letter, text in kept.items():
        if letter not in REGENERATED and letter not in sections:
            sections[letter] = text
    ordered = [sections[key] for key in sorted(sections)]
    path.write_text("\n\n".join(ordered + [ALL_RUNS + "\n\n" + runs_table(results)]) + "\n", encoding="utf-8")
    # the evidence behind every number of (a)-(f), (i) and (j), beside the page (compact: per-row marks and losses)
    (out / RESULTS_COPY).write_text(json.dumps(results, separators=(",", ":")) + "\n", encoding="utf-8")
    return path
