"""Section (j) of docs/lab.md: rank capacity in LoRA Without Regret's regime, where the data hold more bits than a
low-rank adapter has parameters.

    data    `knowledge_rows`: fictional countries (names built from syllables) each with random 4-digit codes, made
            deterministically from a seed; each fact is one question/answer row, and appears `repeats` times in one
            shuffled stream that is trained on in a single pass (the paper's regime: no epochs over a small set)
    bits    facts x log2(CODES): the information the stream holds, set beside each rank's trainable count
    runs    all-linear LoRA at each rank of the lab (alpha/r scaling, so one learning rate serves every rank: (b)'s
            reference rank's grid best), one run per final seed; training loss per step (the curves) and each fact's
            loss after the pass (the verdict)

The verdict reads the curves' end: the lowest rank's per-fact loss after the pass over the highest rank's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any, Callable

from lorakit.analysis.plots import loss_curve
from lorakit.analysis.sweep import LOSSES_FILE, Cell, run_cell
from lorakit.lab.claims import claim_line, matrix, rule_lines, show, times
from lorakit.lab.evidence import Budget, Rule, bootstrap
from lorakit.plotting import new_figure, save_figure

SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vu", "zel", "dor", "fi", "qua", "nor", "pel", "sul", "tri", "ax", "bem")
ATTRIBUTES = ("postal", "harbour", "treaty", "census", "railway", "archive", "radio", "customs")
CODES = 9000  # codes 1000..9999
CAPACITY = Rule("above", low=1.1)  # lowest rank's per-fact loss after the pass / highest rank's: 10% higher
FOLDER = "capacity"


def country_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct fictional names of 3 syllables."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def knowledge_rows(countries: int, seed: int = 0) -> list[dict]:
    """One question/answer row per (country, attribute): a random code, the same for the same seed."""
    rng = random.Random(f"lorakit-capacity-{seed}")
    rows = []
    for name in country_names(countries, rng):
        for attribute in ATTRIBUTES:
            rows.append({"prompt": f"Question: What is the {attribute} code of {name}?\nAnswer:",
                         "completion": f" {rng.randrange(1000, 1000 + CODES)}", "country": name})
    return rows


def fact_bits(rows: list[dict]) -> float:
    """The information the facts hold: each code one of CODES equally likely values."""
    return len(rows) * math.log2(CODES)


def stream(rows: list[dict], repeats: int, seed: int = 0) -> list[dict]:
    """Every row `repeats` times, shuffled: the single pass's training stream."""
    found = [row for _ in range(repeats) for row in rows]
    random.Random(f"lorakit-capacity-stream-{seed}").shuffle(found)
    return found


def run_capacity(base_cfg: Any, work: Path, ranks: tuple[int, ...], seeds: tuple[int, ...], lr: float,
                 alpha: float, countries: int, repeats: int, budget: Budget, log: Callable[[str], None]) -> dict:
    """Train (or read back) every rank at every seed on the stream, one pass; results for `capacity_section`."""
    facts = knowledge_rows(countries)
    data = dataclasses.replace(base_cfg.data, source=stream(facts, repeats), val_source=None, limit=None)
    runs: dict[str, list[dict]] = {}
    for r in ranks:
        for seed in seeds:
            train = dataclasses.replace(base_cfg.train, epochs=1, seed=seed, save_every=0, eval_every=0)
            cfg = dataclasses.replace(base_cfg, data=data, train=train)
            cell, folder = Cell("lora", lr, r, "all-linear"), Path(work) / FOLDER / f"seed{seed}"
            row = run_cell(cfg, cell, folder, alpha=alpha, loss_rows={"facts": facts}, log=log)
            budget.use("j", f"{FOLDER}/{folder.name}/{cell.name}")
            losses = json.loads((folder / cell.name / LOSSES_FILE).read_text())["facts"]
            runs.setdefault(f"lora-r{r}", []).append(
                {"name": cell.name, "folder": f"{FOLDER}/{folder.name}", "seed": seed, "r": r, "lr": lr,
                 "steps": row["steps"], "trainable_params": row["trainable_params"],
                 "final_train_loss": row["final_train_loss"], "facts": losses})
    return {"facts": len(facts), "countries": countries, "repeats": repeats, "bits": fact_bits(facts),
            "lr": lr, "runs": runs}


FIGURE = "lab_capacity_curves.png"


def capacity_figure(found: dict, work: Path, path: Path) -> Path:
    """(j) training loss vs step of each rank's first seed, in the single pass."""
    figure, (axes,) = new_figure()
    for name, runs in found["runs"].items():
        run = runs[0]
        axes.plot(*zip(*loss_curve(Path(work) / run["folder"], run["name"])),
                  label=f"{name} ({run['trainable_params']:,} params)")
    axes.set(yscale="log", xlabel="step (one pass)", ylabel="training loss",
             title=f"{found['facts']} random facts ({found['bits']:,.0f} bits), loss vs step by rank")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def capacity_section(found: dict, bootstraps: int) -> str:
    """(j): the rule, each rank's parameters against the facts' bits, the curves and the verdict."""
    names = sorted(found["runs"], key=lambda name: found["runs"][name][0]["r"])
    low, top = names[0], names[-1]
    lines = ["## (j) Capacity in the paper's regime: more bits than parameters", "",
             "Claim (LoRA Without Regret): when the data hold more information than a low-rank adapter can store, "
             "its loss stops falling where a higher rank's goes on; below that, ranks learn alike.", "",
             *rule_lines([(f"{low}'s loss on the facts after the pass divided by {top}'s (facts and seeds "
                           "resampled, each rank at the same learning rate)", CAPACITY, times)]), "",
             f"Data: {found['countries']} fictional countries x {len(ATTRIBUTES)} random 4-digit codes = "
             f"{found['facts']} facts, {found['bits']:,.0f} bits (log2 {CODES} each), each fact {found['repeats']} "
             f"times in one shuffled pass; all-linear LoRA at lr {found['lr']:.3g} (alpha/r scaling: one lr for "
             "every rank).", "", f"![loss vs step by rank]({FIGURE})", "",
             "| arm | trainable params | bits per param | final training loss | loss on the facts after the pass |",
             "|---|---:|---:|---:|---:|"]
    for name in names:
        runs = found["runs"][name]
        params = runs[0]["trainable_params"]
        marks = matrix(runs, lambda run: run["facts"])
        final = sum(run["final_train_loss"] for run in runs) / len(runs)
        lines.append(f"| {name} | {params:,} | {found['bits'] / params:.3f} | {final:.4f} | "
                     f"{show(bootstrap({'a': marks}, lambda m: m['a'], bootstraps))} |")
    ratio = bootstrap({"a": matrix(found["runs"][low], lambda run: run["facts"]),
                       "b": matrix(found["runs"][top], lambda run: run["facts"])}, lambda m: m["a"] / m["b"],
                      bootstraps)
    lines += ["", claim_line(f"The low rank runs out of capacity: {low} / {top}, loss on the facts", ratio,
                             CAPACITY, times)]
    return "\n".join(lines)
