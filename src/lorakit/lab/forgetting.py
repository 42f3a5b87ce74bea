"""The sections (e) and (f) of docs/lab.md: what LoRA and full fine-tuning change besides the task.

(e) learning vs forgetting: LoRA's and full fine-tuning's finals (learns less? forgets less?) and their trade-off
curves (held-out loss vs general-text loss over learning rates and epochs, a checkpoint per epoch, the same lattice
offsets around each method's best lr). (f) intruder dimensions of every run of both methods, against a random
update with the same singular values, and the paper's causal test (their singular values scaled down). Rules as
in lab/claims.py: stated before the numbers, decided by intervals.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lorakit.lab.claims import (CAUSAL_FORGETS, CAUSAL_KEEPS, CURVE_MARGIN, EPS_SHOWN, FORGETS_LESS, LEARNS_LESS,
                                LEVELS, MORE_INTRUDERS, NOT_RANDOM, SAME_CURVE, claim_line, compare, losses, nats,
                                pct, reference, rule_lines, times)
from lorakit.lab.evidence import Estimate, bootstrap
from lorakit.lab.intruders import EPS, SCALE


def tradeoff_runs(results: dict, name: str) -> list[dict]:
    """The arm's runs at its best lattice point plus each trade-off offset (those with a point per epoch)."""
    arm = results["arms"][name]
    wanted = {arm["best_k"] + offset for offset in results["settings"]["tradeoff"]}
    return [run for run in arm["grid"] if run["k"] in wanted and run.get("epochs")]


def _frontier(xs: np.ndarray, ys: np.ndarray, level: float) -> float:
    """The least general loss among points whose held-out loss is at most `level` (else the most-learned point's)."""
    reached = xs <= level
    return float(ys[reached].min()) if reached.any() else float(ys[np.argmin(xs)])


def curve_gap(results: dict, a: str, b: str) -> tuple[Estimate | None, list[float]]:
    """(mean over matched held-out-loss levels of a's frontier minus b's, in general-text loss; the levels), test
    questions and documents resampled; None when the two curves do not overlap in held-out loss."""
    points = {name: [(np.array([p["test"]]), np.array([p["general"]])) for run in tradeoff_runs(results, name)
                     for p in run["epochs"]] for name in (a, b)}
    if not points[a] or not points[b]:
        return None, []
    reach = {name: [x.mean() for x, _ in found] for name, found in points.items()}
    low, high = max(min(r) for r in reach.values()), min(max(r) for r in reach.values())
    if low >= high:
        return None, []
    levels = list(np.geomspace(low, high, LEVELS))
    arms, groups = {}, {}
    for name, found in points.items():
        for i, (x, y) in enumerate(found):
            arms[f"{name}:x{i}"], groups[f"{name}:x{i}"] = x, "questions"
            arms[f"{name}:y{i}"], groups[f"{name}:y{i}"] = y, "documents"

    def statistic(means: dict[str, float]) -> float:
        curves = {name: (np.array([means[f"{name}:x{i}"] for i in range(len(found))]),
                         np.array([means[f"{name}:y{i}"] for i in range(len(found))]))
                  for name, found in points.items()}
        return float(np.mean([_frontier(*curves[a], level) - _frontier(*curves[b], level) for level in levels]))

    return bootstrap(arms, statistic, results["settings"]["bootstrap"], groups=groups), levels


def forgetting_section(results: dict) -> str:
    """(e) learns less, forgets less, and the trade-off curves."""
    ref, base = reference(results), results["base"]
    lines = ["## (e) Learning vs forgetting, LoRA vs full", "",
             "Claim (Biderman et al. 2024, \"LoRA Learns Less and Forgets Less\"): full fine-tuning learns the "
             "target task better and LoRA keeps more of the base model's other abilities. Their trade-off analysis "
             "(section 4.3) plots forgetting against learning for models trained for different lengths and finds "
             "that LoRA and full fine-tuning seem to lie on the same learning-forgetting curve: LoRA sits further "
             "toward less learning and less forgetting, not on a better curve.", "",
             *rule_lines([(f"{ref}'s test QA loss divided by full fine-tuning's (finals: each at its learning rate, "
                           "test questions and seeds resampled)", LEARNS_LESS, times),
                          (f"{ref}'s general-text loss minus full's, in nats (documents and seeds resampled)",
                           FORGETS_LESS, nats),
                          (f"the gap between the two trade-off frontiers: {ref}'s least general-text loss at a "
                           f"given test QA loss minus full's, averaged over {LEVELS} levels spread over the test "
                           "losses both reach (seed 0; test questions and documents resampled; a margin of "
                           f"{CURVE_MARGIN} nats)", SAME_CURVE, nats)]), "",
             "![learning vs forgetting](lab_forgetting.png)", "",
             f"General-text loss of the base model: {np.mean(base['losses']['general']):.4f}. Trade-off runs: "
             f"{len(tradeoff_runs(results, ref))} learning rates per method (the best and offsets "
             f"{list(results['settings']['tradeoff'])} on the 2x lattice), a checkpoint per epoch each.", "",
             "| method | lr | test QA loss by epoch | general-text loss by epoch |", "|---|---:|---|---|"]
    for name in (ref, "full"):
        for run in tradeoff_runs(results, name):
            test = ", ".join(f"{np.mean(p['test']):.3f}" for p in run["epochs"])
            general = ", ".join(f"{np.mean(p['general']):.3f}" for p in run["epochs"])
            lines.append(f"| {name} | {run['lr']:.3g} | {test} | {general} |")
    gap, levels = curve_gap(results, ref, "full")
    lines += ["", claim_line(f"LoRA learns less: {ref} / full, test QA loss", compare(results, ref, "full",
                                                                                     losses("test")),
                             LEARNS_LESS, times), "",
              claim_line(f"LoRA forgets less: {ref} minus full, general-text loss",
                         compare(results, ref, "full", losses("general"), how="difference"), FORGETS_LESS, nats),
              "", claim_line(f"The same trade-off curve: {ref}'s frontier minus full's", gap, SAME_CURVE, nats,
                             f"Levels of test QA loss: {', '.join(f'{v:.3f}' for v in levels)}." if levels else
                             "The two curves reach no common test QA loss.")]
    return "\n".join(lines)


def _counts(runs: Sequence[dict], eps: float, key: str = "cosines") -> np.ndarray:
    """(seeds x 1) intruder counts."""
    return np.array([[sum(1 for c in run["intruders"][key] if c < eps)] for run in runs], dtype=float)


def intruder_section(results: dict) -> str:
    """(f) intruder dimensions of both methods' finals, against eps, update size and a random update."""
    ref, b = reference(results), results["settings"]["bootstrap"]
    finals = {name: results["arms"][name]["finals"] for name in (ref, "full")}
    lines = ["## (f) Intruder dimensions, LoRA vs full", "",
             "Claim (Shuttleworth et al. 2024, \"LoRA vs Full Fine-tuning: An Illusion of Equivalence\"): LoRA "
             "creates intruder dimensions, high-ranking singular vectors of the fine-tuned weight unlike any of the "
             f"base weight's; full fine-tuning barely does. Measured as in the paper: top 10 singular vectors, "
             f"intruder when the largest |cosine| with every base singular vector is below eps = {EPS}, over every "
             "linear layer. Baseline: the base weight plus a random matrix with exactly the update's singular "
             "values (random singular vectors), an update of the same size and rank.", "",
             *rule_lines([(f"{ref}'s intruder count minus full fine-tuning's (finals at each one's learning rate; "
                           "seeds resampled, the only source of variation)", MORE_INTRUDERS, "{:+.1f}".format),
                          (f"{ref}'s intruder count minus that of the random update of the same spectrum",
                           NOT_RANDOM, "{:+.1f}".format),
                          (f"(the paper's causal test) {ref}'s general-text loss with the singular values of its "
                           f"intruder directions scaled by {SCALE}, minus without (merged weights both; documents "
                           "and seeds resampled): scaling them down undoes forgetting", CAUSAL_FORGETS,
                           nats),
                          (f"{ref}'s test exact match with its intruders scaled by {SCALE}, minus without: the task "
                           "is kept", CAUSAL_KEEPS, pct)]), "",
             "![intruders vs update size](lab_intruders.png)", "",
             "| run | seed | update size ‖dW‖/‖W‖ | " + " | ".join(f"intruders, eps {e}" for e in EPS_SHOWN)
             + f" | random update, eps {EPS} |", "|---|---:|---:|" + "---:|" * (len(EPS_SHOWN) + 1)]
    for name, runs in finals.items():
        for run in runs:
            cells = [str(int(_counts([run], eps)[0, 0])) for eps in EPS_SHOWN]
            lines.append(f"| {name} lr {run['lr']:.3g} | {run['seed']} | {run['intruders']['size']:.4f} | "
                         + " | ".join(cells) + f" | {int(_counts([run], EPS, 'random_cosines')[0, 0])} |")
    more = bootstrap({"a": _counts(finals[ref], EPS), "b": _counts(finals["full"], EPS)},
                     lambda m: m["a"] - m["b"], b, groups={"a": "lora", "b": "full"})
    random = bootstrap({"a": _counts(finals[ref], EPS), "b": _counts(finals[ref], EPS, "random_cosines")},
                       lambda m: m["a"] - m["b"], b, groups={"a": "lora", "b": "random"})
    fmt = "{:+.1f}".format
    grid = {name: sorted(results["arms"][name]["grid"], key=lambda run: run["intruders"]["size"]) for name in finals}
    lines += ["", *causal_table(finals), "",
              claim_line(f"LoRA makes more intruders: {ref} minus full", more, MORE_INTRUDERS, fmt), "",
              claim_line(f"LoRA's intruders are its own: {ref} minus a random update of its spectrum", random,
                         NOT_RANDOM, fmt), "",
              claim_line(f"Scaling LoRA's intruders down undoes forgetting: {ref}, general-text loss after minus "
                         "before", causal_change(finals[ref], "general", b), CAUSAL_FORGETS, nats), "",
              claim_line(f"Scaling them down keeps the task: {ref}, test exact match after minus before",
                         causal_change(finals[ref], "correct", b), CAUSAL_KEEPS, pct), "",
              "Against update size (seed-0 grid, eps 0.5): " + "; ".join(
                  f"{name}: " + ", ".join(f"{run['intruders']['size']:.3f} -> {int(_counts([run], EPS)[0, 0])}"
                                          for run in runs) for name, runs in grid.items())
              + ". A larger update (a higher learning rate) can make intruders with either method."]
    return "\n".join(lines)


def causal_change(runs: Sequence[dict], key: str, resamples: int) -> Estimate:
    """Mean of (with the intruders scaled down minus without) per seed and row: general loss, test loss or test
    exact match; rows and seeds resampled (the pairs stay pairs)."""
    marks = np.array([np.array(run["causal"]["after"][key], dtype=float) - np.array(run["causal"]["before"][key],
                                                                                       dtype=float) for run in runs])
    return bootstrap({"a": marks}, lambda m: m["a"], resamples)


def causal_table(finals: dict[str, list[dict]]) -> list[str]:
    """Per final run: intruders scaled, general-text loss and test exact match before and after."""
    lines = [f"| run | seed | intruders scaled (eps {EPS}) | general-text loss: before -> after | "
             "test exact match: before -> after |", "|---|---:|---:|---:|---:|"]
    for name, runs in finals.items():
        for run in runs:
            before, after = run["causal"]["before"], run["causal"]["after"]
            lines.append(f"| {name} | {run['seed']} | {int(_counts([run], EPS)[0, 0])} | "
                         f"{np.mean(before['general']):.4f} -> {np.mean(after['general']):.4f} | "
                         f"{pct(np.mean(before['correct']))} -> {pct(np.mean(after['correct']))} |")
    return lines
