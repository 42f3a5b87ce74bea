"""Section (i) of docs/lab.md: more of the lecture's claims, on the arms `lab.experiments.more_arms` adds.

    DoRA     DoRA r16 against LoRA r16 (all-linear, each at its own learning rate): test QA loss ratio
    QLoRA    QLoRA r16 (NF4 base) against LoRA r16: test QA loss ratio, and training time per step (reported only)
    alpha    LoRA r16 at three alphas, each searched: lr x alpha at the lowest alpha over at the highest
    batch    LoRA r16 at micro-batch 4, 16, 64 and full fine-tuning at 16 and 64: how much LoRA's test loss grows
             from 16 to 64 over how much full fine-tuning's does

Rules first (`rule_lines`), then numbers, then verdicts, like (a)-(f); every number from `run_lab`'s results.
"""
from __future__ import annotations

import numpy as np

from lorakit.lab.claims import (ARM_HEADER, arm_row, claim_line, compare, losses, matrix, optimum_ratio, reference,
                                rule_lines, show, times)
from lorakit.lab.evidence import Estimate, Rule, bootstrap, lattice_lr

DORA = Rule("below", high=1.05)  # DoRA r16's test QA loss / LoRA r16's: "matches or beats" = at most 5% worse
QLORA = Rule("within", low=1 / 1.1, high=1.1)  # QLoRA r16's test QA loss / LoRA r16's: within 10% either way
ALPHA_LR = Rule("within", low=0.25, high=4.0)  # (lr x alpha) at the lowest alpha / at the highest
BATCH = Rule("above", low=1.0)  # (LoRA loss at the big batch / at the recipe's) / (full's / full's)


def alpha_arms(results: dict) -> list[tuple[float, str]]:
    """(alpha, arm) of the reference rank's all-linear LoRA at the recipe's micro-batch, lowest alpha first."""
    ref = results["arms"][reference(results)]
    found = [(arm.get("alpha", results["alpha"]), name) for name, arm in results["arms"].items()
             if arm["method"] == "lora" and arm["r"] == ref["r"] and arm["targets"] == ref["targets"]
             and arm.get("micro_batch") is None]
    return sorted(found)


def batch_arms(results: dict, method: str) -> list[tuple[int, str]]:
    """(micro-batch, arm) of the reference LoRA (method "lora") or of full fine-tuning, smallest batch first; the
    recipe's arm counts at the recipe's micro-batch."""
    ref = results["arms"][reference(results)]
    recipe = results["recipe"]["micro_batch_size"]
    found = [(arm.get("micro_batch") or recipe, name) for name, arm in results["arms"].items()
             if arm["method"] == method and arm.get("alpha", results["alpha"]) == results["alpha"]
             and (method == "full" or (arm["r"] == ref["r"] and arm["targets"] == ref["targets"]))]
    return sorted(found)


def lr_times_alpha_ratio(optimum: Estimate, low_alpha: float, high_alpha: float) -> Estimate:
    """(lr x alpha) at `low_alpha` over at `high_alpha`, from the ratio of their fitted optimal lrs (low / high)."""
    scale = low_alpha / high_alpha
    return Estimate(optimum.value * scale, optimum.low * scale, optimum.high * scale)


def step_times(runs: list[dict]) -> np.ndarray:
    """(runs x 1) training seconds per optimizer step."""
    return np.array([[run["train_time_s"] / max(run["steps"], 1)] for run in runs], dtype=float)


def has_more(results: dict) -> bool:
    """Whether the results hold (i)'s arms."""
    ref = results["reference_rank"]
    return {f"dora-r{ref}", f"qlora-r{ref}"} <= set(results["arms"]) and len(alpha_arms(results)) > 1 \
        and len(batch_arms(results, "full")) > 1


def more_section(results: dict) -> str:
    """(i): DoRA, QLoRA, the alpha/lr trade-off and batch-size sensitivity."""
    ref, bootstraps = reference(results), results["settings"]["bootstrap"]
    rank = results["reference_rank"]
    dora, qlora = f"dora-r{rank}", f"qlora-r{rank}"
    alphas = alpha_arms(results)
    (low_alpha, low_arm), (high_alpha, high_arm) = alphas[0], alphas[-1]
    lora_batches, full_batches = batch_arms(results, "lora"), batch_arms(results, "full")
    recipe = results["recipe"]["micro_batch_size"]
    big = max(b for b, _ in full_batches)
    lora_at = dict(lora_batches)
    full_at = dict(full_batches)
    lines = ["## (i) More of the lecture's claims", "",
             "Claims: DoRA (weight-decomposed LoRA) matches or beats LoRA at the same rank; QLoRA (LoRA on a 4-bit "
             "NF4 base) matches 16-bit LoRA's quality at a cost in step time; with alpha/r scaling the optimal "
             "learning rate scales about as 1/alpha (lr x alpha about constant); LoRA is less tolerant of large "
             "batches than full fine-tuning (LoRA Without Regret). Every arm has its own learning-rate search on "
             "validation, like (a)-(f); the alpha arms need only that search (no test seeds).", "",
             *rule_lines([
                 (f"{dora}'s test QA loss divided by {ref}'s (test questions and seeds resampled)", DORA, times),
                 (f"{qlora}'s test QA loss divided by {ref}'s", QLORA, times),
                 (f"(fitted optimal lr x alpha) at alpha {low_alpha:g} divided by at alpha {high_alpha:g} "
                  f"({low_arm} vs {high_arm}; validation questions resampled, parabolas refitted). If the optimal lr "
                  f"did not depend on alpha this would be {low_alpha / high_alpha:g}. An optimum at the edge of its "
                  "grid makes the verdict inconclusive", ALPHA_LR, times),
                 (f"LoRA's test QA loss at micro-batch {big} over at {recipe}, divided by the same ratio for full "
                  "fine-tuning (each arm at its own learning rate; the same test questions for all four)", BATCH,
                  times)]), "",
             "QLoRA's step time is measured and reported without a verdict: these runs are on CPU, where "
             "bitsandbytes' NF4 path is not representative of GPU speed (and runs may share the CPU with others "
             "when `--workers` is above 1).", "",
             "### DoRA and QLoRA", "", *ARM_HEADER]
    lines += [arm_row(results, name) for name in (ref, dora, qlora)]
    step = bootstrap({"a": step_times(results["arms"][qlora]["finals"]),
                      "b": step_times(results["arms"][ref]["finals"])}, lambda m: m["a"] / m["b"], bootstraps)
    lines += ["", f"Training time per step (seeds resampled): {qlora} / {ref} = {show(step, times)}, "
                  f"{1000 * step_times(results['arms'][qlora]['finals']).mean():.1f} ms vs "
                  f"{1000 * step_times(results['arms'][ref]['finals']).mean():.1f} ms (CPU; not a GPU measurement).",
              "", claim_line(f"DoRA matches or beats LoRA: {dora} / {ref}, test QA loss",
                             compare(results, dora, ref, losses("test")), DORA, times), "",
              claim_line(f"QLoRA matches LoRA: {qlora} / {ref}, test QA loss",
                         compare(results, qlora, ref, losses("test")), QLORA, times), ""]
    lines += ["### Alpha and the learning rate", "",
              "| arm | alpha | validation QA loss by lr (seed 0) | grid best | fitted optimum | fitted lr x alpha |",
              "|---|---:|---|---:|---:|---:|"]
    for alpha, name in alphas:
        arm = results["arms"][name]
        grid = ", ".join(f"{run['lr']:.3g}: {run['validation_loss']:.4f}" for run in arm["grid"])
        edge = " (**grid edge**)" if arm["at_edge"] else ""
        lines.append(f"| {name} | {alpha:g} | {grid} | {lattice_lr(arm['best_k']):.3g}{edge} | "
                     f"{lattice_lr(arm['fit_k']):.3g} | {lattice_lr(arm['fit_k']) * alpha:.3g} |")
    edges = [name for name in (low_arm, high_arm) if results["arms"][name]["at_edge"]]
    ratio = lr_times_alpha_ratio(optimum_ratio(results, low_arm, high_arm), low_alpha, high_alpha)
    note = f"{' and '.join(edges)}'s optimum sits at the edge of its grid, so the ratio is not known." if edges else ""
    lines += ["", claim_line(f"Optimal lr scales as 1/alpha: lr x alpha at {low_alpha:g} / at {high_alpha:g}", ratio,
                             ALPHA_LR, times, note, force="inconclusive" if edges else None), ""]
    lines += ["### Batch size", "", *ARM_HEADER]
    lines += [arm_row(results, name) for _, name in lora_batches + full_batches]
    lines.append("")
    for method, found in (("LoRA", lora_at), ("full", full_at)):
        for small in sorted(batch for batch in found if batch != big):
            grows = compare(results, found[big], found[small], losses("test"))
            lines.append(f"- {method}: test QA loss at micro-batch {big} / at {small}: {show(grows, times)}")
    pair = {"a": lora_at[big], "b": lora_at[recipe], "c": full_at[big], "d": full_at[recipe]}
    marks = {key: matrix(results["arms"][name]["finals"], losses("test")) for key, name in pair.items()}
    gap = bootstrap(marks, lambda m: (m["a"] / m["b"]) / (m["c"] / m["d"]), bootstraps)
    lines += ["", "Not tested: full fine-tuning below the recipe's micro-batch, and batch sizes at a fixed number of "
                  "steps (every run here makes the same number of epochs, so a bigger batch also means fewer steps, "
                  "for both methods).", "",
              claim_line(f"LoRA is less tolerant of large batches: (LoRA {big}/{recipe}) / (full {big}/{recipe}), "
                         "test QA loss", gap, BATCH, times)]
    return "\n".join(lines)
