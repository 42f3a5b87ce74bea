"""The sections (a)-(f) of docs/lab.md: each lecture claim, its rule, the lab's numbers and the verdict.

Every section states its rules (the `Rule`s below, printed by `Rule.describe`) before its numbers; every number
and interval is computed here from `lab.experiments.run_lab`'s results by `lab.evidence`; nothing is typed in.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lorakit.lab.evidence import (LEVEL, Estimate, Rule, bootstrap, fit_optimum, lattice_lr, pct, verdict_word)
from lorakit.lab.intruders import EPS

REGENERATE = "lorakit lab-report --out docs --work runs/lab --all --workers 2"
MATCH = 1.5  # "matches": a loss ratio within 1.5x either way
SFT = Rule("above", low=0.5)  # (a) LoRA's test exact match minus the base model's
KNEW = Rule("above", low=0.5)  # (a) the base model's fill-in-the-blank accuracy
RANK_MATCH = Rule("within", low=1 / MATCH, high=MATCH)  # (b) highest rank's training-row loss / full's
RANK_LOW = Rule("above", low=1.0)  # (b) lowest rank's training-row loss / highest rank's
LR_RATIO = Rule("within", low=5.0, high=20.0)  # (c) LoRA's fitted optimal lr / full's ("about 10x")
ATTENTION = Rule("above", low=1.0)  # (d) attention-only's test loss / all-linear's
MLP = Rule("within", low=1 / MATCH, high=MATCH)  # (d) MLP-only's test loss / all-linear's
LEARNS_LESS = Rule("above", low=1.0)  # (e) LoRA's test loss / full's
FORGETS_LESS = Rule("below", high=0.0)  # (e) LoRA's general-text loss minus full's
CURVE_MARGIN = 0.05  # nats of general-text loss
SAME_CURVE = Rule("within", low=-CURVE_MARGIN, high=CURVE_MARGIN)  # (e) frontier gap at matched learning
LEVELS = 5  # (e) matched learning levels on the overlap of both frontiers
MORE_INTRUDERS = Rule("above", low=0.0)  # (f) LoRA's intruder count minus full's
NOT_RANDOM = Rule("above", low=0.0)  # (f) LoRA's intruder count minus a random update's of the same spectrum
CAUSAL_FORGETS = Rule("below", high=0.0)  # (f) general-text loss with LoRA's intruders scaled down minus without
CAUSAL_KEEPS = Rule("within", low=-0.05, high=0.05)  # (f) test exact match with them scaled down minus without
EPS_SHOWN = (0.3, EPS, 0.7)


def times(value: float) -> str:
    return f"{value:.2f}x"


def nats(value: float) -> str:
    return f"{value:+.3f}"


def show(found: Estimate, fmt: Callable[[float], str] = "{:.4f}".format) -> str:
    """'value [low, high]'."""
    return f"{fmt(found.value)} [{fmt(found.low)}, {fmt(found.high)}]"


def claim_line(label: str, found: Estimate | None, rule: Rule, fmt: Callable[[float], str], note: str = "",
               force: str | None = None) -> str:
    """The verdict of one claim and the interval it rests on; `force`: a verdict the data cannot decide."""
    if found is None:
        return f"{verdict_word('inconclusive')} {label}: not measured. {note}".rstrip()
    word = force or rule.verdict(found.interval)
    return f"{verdict_word(word)} {label}: {show(found, fmt)}. {note}".rstrip()


def rule_lines(rules: Sequence[tuple[str, Rule, Callable[[float], str]]]) -> list[str]:
    """The section's rules, fixed before the runs, as a list."""
    return ["**Rules, fixed before the runs:**", ""] + [f"- {rule.describe(quantity, fmt)}"
                                                         for quantity, rule, fmt in rules]


# --- reading results ----------------------------------------------------------------------------------------------

def matrix(runs: Sequence[dict], get: Callable[[dict], Sequence[float]]) -> np.ndarray:
    """(runs x items) of one per-row score."""
    return np.array([list(get(run)) for run in runs], dtype=float)


def test_correct(run: dict) -> list[bool]:
    return run["correct"]["test"]


def losses(name: str) -> Callable[[dict], list[float]]:
    return lambda run: run["losses"][name]


def mean_of(results: dict, arm: str, get: Callable[[dict], Sequence[float]]) -> Estimate:
    """An arm's finals: the mean of a per-row score over seeds and rows, with its interval."""
    marks = matrix(results["arms"][arm]["finals"], get)
    return bootstrap({"a": marks}, lambda m: m["a"], results["settings"]["bootstrap"])


def compare(results: dict, a: str, b: str, get: Callable[[dict], Sequence[float]], how: str = "ratio"
            ) -> Estimate:
    """a's finals against b's on the same rows (paired): the ratio or the difference of their means."""
    arms = {"a": matrix(results["arms"][a]["finals"], get), "b": matrix(results["arms"][b]["finals"], get)}
    statistic = (lambda m: m["a"] / m["b"]) if how == "ratio" else (lambda m: m["a"] - m["b"])
    return bootstrap(arms, statistic, results["settings"]["bootstrap"])


def base_marks(results: dict, get: Callable[[dict], Sequence[float]]) -> np.ndarray:
    return matrix([results["base"]], get)


def reference(results: dict) -> str:
    return f"lora-r{results['reference_rank']}"


def lora_ranks(results: dict) -> list[str]:
    """The all-linear LoRA arms, lowest rank first."""
    arms = [(arm["r"], name) for name, arm in results["arms"].items()
            if arm["method"] == "lora" and arm["targets"] == "all-linear" and is_recipe(results, arm)]
    return [name for _, name in sorted(arms)]


def is_recipe(results: dict, arm: dict) -> bool:
    """Whether an arm trains at the recipe's alpha and micro-batch (every arm of (a)-(f); (i) varies them)."""
    return arm.get("alpha", results["alpha"]) == results["alpha"] and arm.get("micro_batch") is None


def arm_row(results: dict, name: str) -> str:
    """A table row of an arm's finals: params, lr, training-row loss, test loss, test exact match."""
    arm = results["arms"][name]
    return (f"| {name} | {arm['finals'][0]['trainable_params']:,} | {lattice_lr(arm['best_k']):.3g} | "
            f"{show(mean_of(results, name, losses('train')))} | {show(mean_of(results, name, losses('test')))} | "
            f"{show(mean_of(results, name, test_correct), pct)} |")


ARM_HEADER = ["| arm | trainable params | lr (grid best) | training-row loss | test QA loss | test exact match |",
              "|---|---:|---:|---:|---:|---:|"]


# --- the sections -------------------------------------------------------------------------------------------------

def header(results: dict) -> str:
    """What was run, how learning rates are chosen, how verdicts are decided, and the run budget."""
    s, q = results["settings"], results["questions"]
    countries = {name: len({row["country"] for row in rows}) for name, rows in q.items()}
    budget = results["budget"]
    lines = [
        "# The lecture's claims at small scale: the embedded lab", "",
        f"Regenerate this page (and its figures) with `{REGENERATE}` (resumable: every run is a folder with a "
        "cell.json, so a killed lab continues where it stopped; `--workers 2` trains two runs at a time; `--all` "
        "also runs (g) and (h), lab-rl's and lab-vision's experiments, which `--rl` and `--vision` run alone; "
        "`--quick` runs the same pipeline on tiny settings). Every number of (a)-(f) "
        "and (i)-(j) comes from [lab_results.json](lab_results.json), written beside this page; (g) and (h) have "
        "their own.", "",
        "- Model: the embedded Llama-shaped model (hidden 128, 4 layers), pre-trained on documents about "
        "countries; it has never seen a question.",
        f"- Fine-tuning data: {results['rows']['train']} question/answer rows about the training countries. "
        f"Held-out questions about the other countries, split by country: **validation** ({len(q['validation'])} "
        f"questions, {countries['validation']} countries) chooses every learning rate and nothing else; **test** "
        f"({len(q['test'])} questions, {countries['test']} countries) gives every reported number. General text: "
        f"{results['rows']['general']} fresh pre-training-style documents (forgetting).",
        f"- Every run: {s['epochs']} epochs, micro-batch {results['recipe']['micro_batch_size']}, "
        f"{results['recipe']['schedule']} decay after {results['recipe']['warmup_steps']} warmup steps, AdamW. "
        f"LoRA alpha is fixed at {results['alpha']:.0f}, so the update is scaled by {results['alpha']:.0f}/r "
        "(LoRA Without Regret's choice); only the arms of (i) change alpha or the micro-batch.",
        "- Learning rates (fixed before the runs): on the lattice lr = 1e-3 x 2^k, a coarse grid at seed 0 (LoRA "
        f"k in {list(s['lora_coarse'])}, full k in {list(s['full_coarse'])}), one coarse step further out while the "
        f"lowest validation QA loss sits at an edge (at most {s['cap']} points), then both neighbours of the best "
        "point (2x spacing). The fitted optimum is the vertex of the parabola through the best point and its "
        "neighbours in log-lr. Each arm's seeds "
        f"({', '.join(map(str, s['seeds']))}) run at its grid best.",
        f"- Intervals: {LEVEL:.0%} bootstrap intervals ({s['bootstrap']} resamples) over test questions (or "
        "documents, or training rows) and seeds, the rows resampled once for both arms of a comparison (paired). "
        "A verdict is **reproduced** only when the interval lies on the claimed side of the rule's threshold (or "
        "inside its band), **not reproduced** when it lies wholly on the other side, **inconclusive** otherwise. "
        f"With {len(q['test'])} test questions and {len(s['seeds'])} seeds, expect inconclusive verdicts where "
        "arms differ by a few points.",
        f"- Run budget: {budget['distinct']} runs in all; by section (a run used by two sections counts in both): "
        + ", ".join(f"({name}) {count}" for name, count in sorted(budget["runs"].items())) + ".",
    ]
    capped = [name for name, arm in results["arms"].items() if arm["state"] == "capped"]
    if capped:
        lines += ["", f"> **Warning: grid edge.** The best learning rate of {', '.join(capped)} sits at the edge of "
                      f"its grid after {s['cap']} points (the cap): the true optimum may lie beyond it, and every "
                      "number of that arm is at a learning rate that may be too small or too large."]
    return "\n".join(lines)


def base_vs_sft(results: dict, shown: int = 8) -> str:
    """(a) held-out accuracy before and after SFT, per question kind, and the fill-in-the-blank probe."""
    ref, base, bootstraps = reference(results), results["base"], results["settings"]["bootstrap"]
    probe = matrix([base["probe"]], lambda p: p["correct"])
    lines = ["## (a) Base model vs fine-tuned: held-out questions", "",
             "Claim: pre-training teaches knowledge, post-training teaches behaviour; a little SFT makes a model "
             "that only continues text answer questions about facts it read, including facts never asked about "
             "in fine-tuning.", "",
             *rule_lines([(f"{ref}'s test exact match minus the base model's", SFT, pct),
                          ("the base model's fill-in-the-blank accuracy on the test questions (the question turned "
                           "into the corpus's own sentence, e.g. \"The capital of France is\"; right when the "
                           "greedy continuation starts with the answer)", KNEW, pct)]), "",
             "| model | test exact match | test QA loss | general-text loss |", "|---|---:|---:|---:|"]
    base_acc = bootstrap({"a": base_marks(results, test_correct)}, lambda m: m["a"], bootstraps)
    lines.append(f"| base | {show(base_acc, pct)} | {np.mean(base['losses']['test']):.4f} | "
                 f"{np.mean(base['losses']['general']):.4f} |")
    for name in (ref, "full"):
        lines.append(f"| {name} (seeds {', '.join(str(r['seed']) for r in results['arms'][name]['finals'])}) | "
                     f"{show(mean_of(results, name, test_correct), pct)} | "
                     f"{show(mean_of(results, name, losses('test')))} | "
                     f"{show(mean_of(results, name, losses('general')))} |")
    lines += ["", *kind_table(results, probe), "", *examples(results, shown), ""]
    gain = bootstrap({"a": matrix(results["arms"][ref]["finals"], test_correct),
                      "b": base_marks(results, test_correct)}, lambda m: m["a"] - m["b"], bootstraps)
    knew = bootstrap({"a": probe}, lambda m: m["a"], bootstraps)
    lines += [claim_line(f"SFT teaches the behaviour: {ref} minus base, test exact match", gain, SFT, pct), "",
              claim_line("The base model already knew the facts: fill-in-the-blank accuracy", knew, KNEW, pct)]
    return "\n".join(lines)


def kind_table(results: dict, probe: np.ndarray) -> list[str]:
    """Test exact match per question kind: base (question and fill-in-the-blank), LoRA, full."""
    kinds = [row["kind"] for row in results["questions"]["test"]]
    ref, b = reference(results), results["settings"]["bootstrap"]
    columns = [("base, question", base_marks(results, test_correct)), ("base, fill-in-the-blank", probe),
               (ref, matrix(results["arms"][ref]["finals"], test_correct)),
               ("full", matrix(results["arms"]["full"]["finals"], test_correct))]
    lines = ["| kind | questions | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for kind in sorted(set(kinds)):
        pick = [i for i, k in enumerate(kinds) if k == kind]
        cells = [show(bootstrap({"a": marks[:, pick]}, lambda m: m["a"], b), pct) for _, marks in columns]
        lines.append(f"| {kind} | {len(pick)} | " + " | ".join(cells) + " |")
    return lines


def examples(results: dict, shown: int) -> list[str]:
    """A few test questions with the base model's answer, its fill-in-the-blank continuation, LoRA's and full's."""
    questions, base, ref = results["questions"]["test"], results["base"], reference(results)
    n_val = len(results["questions"]["validation"])
    lora, full = results["arms"][ref]["finals"][0], results["arms"]["full"]["finals"][0]
    lines = [f"| question | reference | base | base, fill-in-the-blank | {ref} | full |", "|---|---|---|---|---|---|"]
    for i in sorted({(j * len(questions)) // shown for j in range(shown)}):
        row = questions[i]
        cells = [row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:"), row["completion"],
                 base["predictions"][n_val + i], base["probe"]["rows"][i]["prompt"] + base["probe"]["predictions"][i],
                 lora["predictions"][i], full["predictions"][i]]
        lines.append("| " + " | ".join(" ".join(c.split())[:60].replace("|", "/") for c in cells) + " |")
    return lines


def rank_section(results: dict) -> str:
    """(b) capacity by rank: training-row loss of each rank at its lr, full fine-tuning as reference."""
    ranks = lora_ranks(results)
    low, top = ranks[0], ranks[-1]
    lines = ["## (b) Rank sweep", "",
             "Claim (LoRA Without Regret, Schulman et al. 2025): with enough rank LoRA follows full fine-tuning's "
             "learning curve; low ranks fall behind once the data exceed their capacity.", "",
             *rule_lines([(f"{top}'s loss on its own training rows divided by full fine-tuning's (each at its "
                           "learning rate; training rows and seeds resampled)", RANK_MATCH, times),
                          (f"{low}'s training-row loss divided by {top}'s", RANK_LOW, times)]), "",
             "![loss vs step by rank](lab_rank_curves.png)", "", *ARM_HEADER]
    lines += [arm_row(results, name) for name in ranks + ["full"]]
    match = compare(results, top, "full", losses("train"))
    behind = compare(results, low, top, losses("train"))
    lines += ["", claim_line(f"Enough rank matches full: {top} / full, training-row loss", match, RANK_MATCH, times),
              "", claim_line(f"Low rank falls behind: {low} / {top}, training-row loss", behind, RANK_LOW, times), "",
              f"The regime: {results['settings']['epochs']} epochs over {results['rows']['train']} rows, so these "
              "runs memorise a small set; the paper's curves come from about one pass over data larger than the "
              "adapter's capacity, which this section does not test: (j) runs one pass over random facts with each "
              "rank's learning rate searched."]
    return "\n".join(lines)


def _grid_marks(arm: dict) -> dict[int, np.ndarray]:
    """Lattice exponent -> (1 x validation questions) losses of the arm's seed-0 grid."""
    return {run["k"]: np.array([run["losses"]["validation"]]) for run in arm["grid"]}


def optimum_ratio(results: dict, a: str, b: str) -> Estimate:
    """a's fitted optimal lr divided by b's, each fitted on its validation-loss grid; validation questions
    resampled (one seed: the grid's)."""
    grids = {name: _grid_marks(results["arms"][name]) for name in (a, b)}
    arms = {f"{name}:{k}": marks for name, grid in grids.items() for k, marks in grid.items()}

    def statistic(means: dict[str, float]) -> float:
        fitted = {name: fit_optimum({k: means[f"{name}:{k}"] for k in grid})[0] for name, grid in grids.items()}
        return 2.0 ** (fitted[a] - fitted[b])

    return bootstrap(arms, statistic, results["settings"]["bootstrap"])


def lr_section(results: dict) -> str:
    """(c) every arm's lr grid, and LoRA's optimal lr against full fine-tuning's."""
    ref = reference(results)
    lines = ["## (c) Learning rates, LoRA vs full", "",
             "Claim (LoRA Without Regret): LoRA's best learning rate is about 10x full fine-tuning's.", "",
             *rule_lines([(f"{ref}'s fitted optimal learning rate divided by full fine-tuning's (validation QA loss, "
                           "seed 0; validation questions resampled, the parabola refitted each time). An optimum at "
                           "the edge of its grid makes the verdict inconclusive", LR_RATIO, times)]), "",
             "![validation loss vs learning rate](lab_lr_sweep.png)", "",
             "| arm | validation QA loss by lr (seed 0) | grid best | fitted optimum |", "|---|---|---:|---:|"]
    for name, arm in results["arms"].items():
        grid = ", ".join(f"{run['lr']:.3g}: {run['validation_loss']:.4f}" for run in arm["grid"])
        edge = " (**grid edge**)" if arm["at_edge"] else ""
        lines.append(f"| {name} | {grid} | {lattice_lr(arm['best_k']):.3g}{edge} | {lattice_lr(arm['fit_k']):.3g} |")
    edges = [name for name in (ref, "full") if results["arms"][name]["at_edge"]]
    note = (f"{' and '.join(edges)}'s optimum sits at the edge of its grid, so the ratio is not known." if edges
            else f"Fitted optima: {ref} {lattice_lr(results['arms'][ref]['fit_k']):.3g}, full "
                 f"{lattice_lr(results['arms']['full']['fit_k']):.3g}.")
    lines += ["", claim_line(f"{ref} / full, fitted optimal learning rate", optimum_ratio(results, ref, "full"),
                             LR_RATIO, times, note, force="inconclusive" if edges else None)]
    return "\n".join(lines)


def targets_section(results: dict) -> str:
    """(d) attention-only vs MLP-only vs all-linear LoRA at matched trainable counts."""
    ref = reference(results)
    attention = next(name for name in results["arms"] if name.startswith("attention"))
    mlp = next(name for name in results["arms"] if name.startswith("mlp"))
    params = {name: results["arms"][name]["finals"][0]["trainable_params"] for name in (attention, mlp, ref)}
    lines = ["## (d) Target sets at matched parameter counts", "",
             "Claim (LoRA Without Regret): attention-only LoRA underperforms even at the same number of trainable "
             "parameters; MLP-only does about as well as all-linear.", "",
             f"Ranks chosen so that each set trains as many numbers as {ref} ({params[ref]:,}): {attention} "
             f"({params[attention]:,}), {mlp} ({params[mlp]:,}); each with its own learning-rate search.", "",
             *rule_lines([(f"{attention}'s test QA loss divided by {ref}'s (test questions and seeds resampled)",
                           ATTENTION, times),
                          (f"{mlp}'s test QA loss divided by {ref}'s", MLP, times)]), "",
             "![target sets](lab_target_sets.png)", "", *ARM_HEADER]
    lines += [arm_row(results, name) for name in (attention, mlp, ref)]
    lines += ["", claim_line(f"Attention-only underperforms: {attention} / {ref}, test QA loss",
                             compare(results, attention, ref, losses("test")), ATTENTION, times), "",
              claim_line(f"MLP-only matches all-linear: {mlp} / {ref}, test QA loss",
                         compare(results, mlp, ref, losses("test")), MLP, times)]
    return "\n".join(lines)
