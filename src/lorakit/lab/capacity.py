"""Section (j) of docs/lab.md: rank capacity in LoRA Without Regret's regime: one pass over random facts, loss
against step per rank.

    data    `knowledge_rows`: fictional countries (names built from syllables), each with random facts ("What is
            the sister city of Kalomiren?" -> a capital drawn at random from the lab's fact table, so the answer is
            made of words the model knows and only the pairing is new), made deterministically from a seed; each
            fact appears `repeats` times in one shuffled stream trained on in a single pass (no epochs)
    bits    facts x log2(choices): the information the stream holds, set beside each rank's trainable count; which
            half of the claim the sizes put to the test (more bits than the lowest rank's parameters: capacity binds;
            fewer: ranks learn alike) is known before any run
    runs    all-linear LoRA at each rank of the lab (alpha/r scaling), each rank's lr searched on the 2x lattice at
            the search seed (`LRSearch`, scored by its loss on the facts after the pass: fitting them is the task),
            then one run per final seed at its best point; training loss per step (the curves) and each fact's
            loss after the pass (the verdict)

The verdict reads the curves' end: the lowest rank's per-fact loss after the pass over the highest rank's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.analysis.plots import loss_curve
from lorakit.analysis.sweep import LOSSES_FILE, Cell, run_cell
from lorakit.lab.claims import claim_line, matrix, show, times
from lorakit.lab.evidence import Budget, LRSearch, Rule, best_point, bootstrap, lattice_lr, next_points
from lorakit.lab.facts import COUNTRIES
from lorakit.plotting import new_figure, save_figure

SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vu", "zel", "dor", "fi", "qua", "nor", "pel", "sul", "tri", "ax", "bem")
ATTRIBUTES = ("sister city", "partner city", "twin town", "treaty city", "rail hub", "ferry port", "archive city",
              "radio city")
CHOICES = tuple(sorted({country.capital for country in COUNTRIES}))  # every answer: one of the known capitals
CAPACITY = Rule("above", low=1.1)  # more bits than the lowest rank's parameters: its loss / the highest rank's
ALIKE = Rule("within", low=1 / 1.1, high=1.1)  # fewer bits than every rank's parameters: the same ratio, within 10%
LEARNED = 0.5  # a verdict needs the highest rank's loss on the facts below this fraction of its loss on the decoys
FOLDER = "random-facts"  # (an earlier design with digit codes ran in "capacity": not read back)
Log = Callable[[str], None]
TrainMany = Callable[[Callable[[tuple], None], list[tuple]], None]  # trains jobs in worker processes (or not at all)


def country_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct fictional names of 3 syllables."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def knowledge_rows(countries: int, seed: int = 0) -> list[dict]:
    """One question/answer row per (country, attribute): a capital drawn at random, the same for the same seed."""
    rng = random.Random(f"lorakit-capacity-{seed}")
    rows = []
    for name in country_names(countries, rng):
        for attribute in ATTRIBUTES:
            rows.append({"prompt": f"Question: What is the {attribute} of {name}?\nAnswer:",
                         "completion": f" {rng.choice(CHOICES)}", "country": name})
    return rows


def decoy_rows(rows: list[dict], seed: int = 0) -> list[dict]:
    """The same questions with answers drawn afresh (another capital than the fact's): what a model that learned
    the format and the answers' spread, but not the pairings, scores as well as on the facts."""
    rng = random.Random(f"lorakit-capacity-decoys-{seed}")
    return [{**row, "completion": f" {rng.choice([c for c in CHOICES if f' {c}' != row['completion']])}"}
            for row in rows]


def fact_bits(rows: list[dict]) -> float:
    """The information the facts hold: each answer one of CHOICES, equally likely."""
    return len(rows) * math.log2(len(CHOICES))


def stream(rows: list[dict], repeats: int, seed: int = 0) -> list[dict]:
    """Every row `repeats` times, shuffled: the single pass's training stream."""
    found = [row for _ in range(repeats) for row in rows]
    random.Random(f"lorakit-capacity-stream-{seed}").shuffle(found)
    return found


def train_job(job: tuple) -> None:
    """Train one capacity run in a worker process (read back by `run_capacity` in the parent)."""
    cfg, cell, folder, loss_rows, alpha = job
    run_cell(cfg, cell, folder, alpha=alpha, loss_rows=loss_rows, log=lambda line: None)


def run_capacity(base_cfg: Any, work: Path, ranks: Sequence[int], seeds: Sequence[int], search: LRSearch,
                 search_seed: int, alpha: float, countries: int, repeats: int, budget: Budget, log: Log,
                 train_many: TrainMany) -> dict:
    """Search every rank's lr at `search_seed`, then train every rank at every seed at its best point (or read the
    runs back), in one pass over the stream; results for `capacity_section`. `train_many(train_job, jobs)` may
    train a round's runs in parallel first; whatever it leaves is trained here."""
    facts = knowledge_rows(countries)
    loss_rows = {"facts": facts, "decoys": decoy_rows(facts)}
    data = dataclasses.replace(base_cfg.data, source=stream(facts, repeats), val_source=None, limit=None)

    def job(r: int, k: int, seed: int) -> tuple:
        train = dataclasses.replace(base_cfg.train, epochs=1, seed=seed, save_every=0, eval_every=0)
        return (dataclasses.replace(base_cfg, data=data, train=train), Cell("lora", lattice_lr(k), r, "all-linear"),
                Path(work) / FOLDER / f"seed{seed}", loss_rows, alpha)

    def runs(todo: list[tuple[int, int, int]]) -> list[dict]:
        train_many(train_job, [job(*run) for run in todo])
        found = []
        for r, k, seed in todo:
            cfg, cell, folder, _, _ = job(r, k, seed)
            row = run_cell(cfg, cell, folder, alpha=alpha, loss_rows=loss_rows, log=log)
            budget.use("j", f"{FOLDER}/{folder.name}/{cell.name}")
            scored = json.loads((folder / cell.name / LOSSES_FILE).read_text())
            found.append({"name": cell.name, "folder": f"{FOLDER}/{folder.name}", "seed": seed, "r": r, "k": k,
                          "lr": cell.lr, "steps": row["steps"], "trainable_params": row["trainable_params"],
                          "final_train_loss": row["final_train_loss"], "facts": scored["facts"],
                          "decoys": float(np.mean(scored["decoys"]))})
        return found

    grids: dict[int, dict[int, dict]] = {r: {} for r in ranks}
    states: dict[int, str] = {}
    while True:  # the lr searches, a round of every rank's next points at a time
        todo = []
        for r in ranks:
            ks, states[r] = next_points(search, _scored(grids[r]))
            todo += [(r, k, search_seed) for k in ks]
        if not todo:
            break
        for (r, k, _), run in zip(todo, runs(todo)):
            grids[r][k] = run
    best = {r: best_point(_scored(grids[r])) for r in ranks}
    for r in ranks:
        if states[r] == "capped":
            log(f"lab: WARNING (j) lora-r{r}'s best lr {lattice_lr(best[r]):.3g} is at the edge of its grid (the cap)")
    finals = runs([(r, best[r], seed) for r in ranks for seed in seeds])
    return {"facts": len(facts), "countries": countries, "repeats": repeats, "bits": fact_bits(facts),
            "choices": len(CHOICES), "runs": {f"lora-r{r}": [run for run in finals if run["r"] == r] for r in ranks},
            "grids": {f"lora-r{r}": [grids[r][k] for k in sorted(grids[r])] for r in ranks},
            "search": {f"lora-r{r}": {"best_k": best[r], "state": states[r]} for r in ranks}}


def _scored(grid: dict[int, dict]) -> dict[int, float]:
    """Lattice point -> mean loss on the facts after the pass."""
    return {k: float(np.mean(run["facts"])) for k, run in grid.items()}


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


def capacity_rule(found: dict) -> tuple[Rule, str]:
    """The rule the sizes put to the test (known before any run: the facts' bits, the lowest rank's parameters), and
    the half of the claim it tests."""
    low = min(runs[0]["trainable_params"] for runs in found["runs"].values())
    if found["bits"] > low:
        return CAPACITY, "The low rank runs out of capacity"
    return ALIKE, "Below capacity, ranks learn alike"


def capacity_section(found: dict, bootstraps: int) -> str:
    """(j): the rules, each rank's parameters against the facts' bits, its lr search, the curves and the verdict."""
    names = sorted(found["runs"], key=lambda name: found["runs"][name][0]["r"])
    low, top = names[0], names[-1]
    rule, claim = capacity_rule(found)
    params = {name: found["runs"][name][0]["trainable_params"] for name in names}
    quantity = (f"{low}'s loss on the facts after the pass divided by {top}'s (facts and seeds resampled, each rank at "
                "its own grid-best learning rate)")
    lines = ["## (j) Capacity in the paper's regime: one pass over random facts", "",
             "Claim (LoRA Without Regret): ranks learn alike while the data hold less information than the adapter "
             "can store; when they hold more, a low rank's loss stops falling where a higher rank's goes on.", "",
             "**Rules, fixed before the runs:**", "",
             "- Which half of the claim is tested follows from sizes known before any run: if the facts hold more bits "
             "than the lowest rank has trainable parameters (the paper's regime), the first rule below; otherwise "
             "the second.",
             f"- *Capacity binds:* {CAPACITY.describe(quantity, times)}",
             f"- *Ranks alike:* {ALIKE.describe(quantity, times)}",
             f"- Either verdict needs {top} to have learned the facts: its loss on them after the pass below "
             f"{LEARNED:.0%} of its loss on decoys (the same questions, other capitals drawn at random: a model that "
             "learned the format and the spread of answers but not the pairings scores both alike); otherwise "
             "**inconclusive**.", "",
             f"Data: {found['countries']} fictional countries x {len(ATTRIBUTES)} random facts (\"What is the sister "
             f"city of ...?\", the answer a capital drawn from {found['choices']}) = {found['facts']} facts, "
             f"{found['bits']:,.0f} bits (log2 {found['choices']} each), each fact {found['repeats']} times in one "
             "shuffled pass. All-linear LoRA, alpha/r scaling; each rank's lr searched on the 2x lattice at seed 0 "
             "by its loss on the facts after the pass (fitting them is the task), then seeds "
             f"{', '.join(str(run['seed']) for run in found['runs'][low])} at the grid best.", "",
             f"![loss vs step by rank]({FIGURE})", "",
             "| arm | trainable params | bits per param | loss on the facts by lr (seed 0) | lr (grid best) | "
             "final training loss | loss on decoys | loss on the facts after the pass |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name in names:
        runs, grid = found["runs"][name], found["grids"][name]
        search = "; ".join(f"{run['lr']:.3g}: {np.mean(run['facts']):.3f}" for run in grid)
        decoys = np.mean([run["decoys"] for run in runs])
        final = np.mean([run["final_train_loss"] for run in runs])
        edge = " (edge)" if found["search"][name]["state"] == "capped" else ""
        lines.append(f"| {name} | {params[name]:,} | {found['bits'] / params[name]:.3f} | {search} | "
                     f"{runs[0]['lr']:.3g}{edge} | {final:.3f} | {decoys:.3f} | "
                     f"{show(bootstrap({'a': matrix(runs, lambda run: run['facts'])}, lambda m: m['a'], bootstraps))} |")
    ratio = bootstrap({"a": matrix(found["runs"][low], lambda run: run["facts"]),
                       "b": matrix(found["runs"][top], lambda run: run["facts"])}, lambda m: m["a"] / m["b"],
                      bootstraps)
    top_runs = found["runs"][top]
    learned = (np.mean([np.mean(run["facts"]) for run in top_runs])
               < LEARNED * np.mean([run["decoys"] for run in top_runs]))
    note = "" if learned else f"{top} did not learn the facts in the pass, so the sizes were not put to the test."
    lines += ["", claim_line(f"{claim}: {low} / {top}, loss on the facts", ratio, rule, times, note,
                             force=None if learned else "inconclusive")]
    if rule is ALIKE:
        bits_per_fact = found["bits"] / found["facts"]
        needed = math.ceil(params[low] / bits_per_fact)
        lines += ["", f"The paper's regime proper (more bits than {low}'s {params[low]:,} parameters) was not reached: "
                  f"it takes more than {needed:,} facts of this kind, {needed * found['repeats']:,} rows at this "
                  f"repeat count, against the {found['facts'] * found['repeats']:,} rows this pass trains on. On this "
                  "model a fact needs about this many repeats before the highest rank fits it, so a set that large "
                  "does not fit the lab's budget; the half of the claim this section can test is the other one."]
    return "\n".join(lines)
