"""docs/lab.md's section (g), rank 1 in RL, and its figure, written from lab/rl.py's results.json.

`lorakit lab-rl` writes the section into an existing lab.md (replacing an earlier (g), else before "## All runs");
`lorakit lab-report` includes it whenever its work folder holds rl/results.json. The verdict is
`lab.rl.verdict`'s, and the rule is printed before the numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lorakit.lab.evidence import pct
from lorakit.lab.rl import MARGIN, SWEEP_SEED
from lorakit.lab.sections import put_section
from lorakit.plotting import new_figure, save_figure

HEADING = "## (g) Reinforcement learning: is LoRA rank 1 enough?"
FIGURE = "lab_rl_curves.png"
RESULTS_COPY = "lab_rl_results.json"  # the results file the section and figure come from, beside lab.md
COMMAND = "lorakit lab-rl --out docs --work runs/lab"


def _interval(found: dict) -> str:
    low, high = found["interval"]
    return f"{pct(found['mean'])} [{pct(low)}, {pct(high)}]"


def _mean_curve(runs: Sequence[dict]) -> list[tuple[int, float]]:
    """(step, mean over seeds) at the steps every seed evaluated."""
    curves = [dict(run["test_curve"]) for run in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(step, sum(c[step] for c in curves) / len(curves)) for step in steps]


def curves_figure(results: dict, path: Path) -> Path:
    """Test exact match vs GRPO step, one line per arm (mean over seeds, seeds faint), the start dotted."""
    figure, (axes,) = new_figure()
    for arm, found in results["arms"].items():
        mean = _mean_curve(found["runs"])
        line = axes.plot([0] + [s for s, _ in mean], [results["weak_sft"]["test_accuracy"]] + [v for _, v in mean],
                         marker="o", label=f"{arm} (lr {found['lr']:.0e})")[0]
        for run in found["runs"]:
            axes.plot([s for s, _ in run["test_curve"]], [v for _, v in run["test_curve"]], color=line.get_color(),
                      alpha=0.25)
    axes.axhline(results["weak_sft"]["test_accuracy"], color="grey", linestyle=":", label="weak SFT start")
    axes.set_xlabel("GRPO step")
    axes.set_ylabel("test exact match (greedy)")
    axes.legend()
    return save_figure(figure, path)


def rl_section(results: dict) -> str:
    """Section (g): setup, the rule, then the numbers and the verdict."""
    s, sft = results["settings"], results["weak_sft"]
    lines = [HEADING, "",
             "Claim (LoRA Without Regret, Schulman et al. 2025): for policy-gradient RL, LoRA matches full "
             "fine-tuning even at rank 1, because an episode carries only a few bits.", "",
             f"Run with `{COMMAND}` (resumable; every number below is in [{RESULTS_COPY}]({RESULTS_COPY})). Start: full SFT stopped after {sft['steps']} steps at lr "
             f"{sft['lr']:.0e}, a length chosen for answers in the right format but often wrong (measured: "
             f"{pct(sft['held_out_accuracy'])} of the held-out questions, {pct(sft['test_accuracy'])} of the test "
             "split). Then GRPO (configs/grpo-embedded.yaml: exact-match reward, "
             f"{s['num_generations']} samples per question, {s['prompts_per_step']} questions per step, constant lr, "
             f"no KL) on the training countries' questions for {s['steps']} steps, for LoRA r1 and r8 (alpha 32, all "
             "linear layers, a fresh adapter on the start) and full fine-tuning. The held-out countries are split "
             f"by country: validation ({results['questions']['validation']} questions, {len(results['splits']['validation'])} "
             f"countries) chooses each arm's lr (seed {SWEEP_SEED}); test ({results['questions']['test']} questions) "
             f"reports, with seeds {', '.join(map(str, s['seeds']))} at the chosen lr.", "",
             f"**Rule, fixed before the runs**: take the 95% bootstrap interval (questions and seeds resampled, "
             f"{s['bootstrap']} resamples) of rank 1's minus full's final test exact match. **Reproduced** when "
             f"the whole interval lies within +-{pct(MARGIN)} (rank 1 matches full); **not reproduced** when it "
             "lies wholly below 0 and not within that margin (rank 1 clearly below); **inconclusive** otherwise.", "",
             "| arm | lr grid (validation exact match, seed 0) | chosen lr |", "|---|---|---:|"]
    for arm, sweep in results["sweep"].items():
        grid = ", ".join(f"{row['lr']:.0e}: {pct(row['validation_accuracy'])}" for row in sweep)
        edge = " (grid edge)" if results["chosen_lr"][arm] in (sweep[0]["lr"], sweep[-1]["lr"]) else ""
        lines.append(f"| {arm} | {grid} | {results['chosen_lr'][arm]:.0e}{edge} |")
    lines += ["", f"![test exact match vs GRPO step]({FIGURE})", "",
              "| arm | trainable params | final test exact match per seed | mean [95% interval] | minus full |",
              "|---|---:|---|---:|---:|", f"| weak SFT start | | | {pct(sft['test_accuracy'])} | |"]
    for arm, found in results["arms"].items():
        per_seed = ", ".join(pct(run["test_accuracy"]) for run in found["runs"])
        diff = _interval(results["minus_full"][arm]) if arm in results["minus_full"] else ""
        lines.append(f"| {arm} | {found['runs'][0]['trainable_params']:,} | {per_seed} | "
                     f"{_interval(results['accuracy'][arm])} | {diff} |")
    lines += ["", "Curves: the loop's greedy evaluation on the test split (eval_reward) every "
              f"{s['eval_every']} steps, mean over seeds; the table's final numbers are `evaluate`'s on the same "
              "questions (batched greedy decoding; it can differ from the loop's by a question or two).", "",
              _verdict_line(results)]
    return "\n".join(lines)


def _verdict_line(results: dict) -> str:
    word, r8 = results["verdict"], results["minus_full"].get("lora-r8")
    start = results["weak_sft"]["test_accuracy"]
    gains = ", ".join(f"{arm} {100 * (found['mean'] - start):+.1f} points" for arm, found in results["accuracy"].items())
    return (f"**{word[0].upper() + word[1:]}.** Rank 1 minus full: {_interval(results['minus_full']['lora-r1'])} "
            f"(margin +-{pct(MARGIN)})" + (f"; rank 8 minus full: {_interval(r8)}" if r8 else "")
            + f". Gain over the start on test: {gains} (a match where no arm gains says little about RL).")


def write_rl_section(lab_md: Path, results: dict) -> Path:
    """Put section (g) and its figure into `lab_md`: replace an earlier (g), else insert it before "## All runs"
    (or at the end); a missing lab.md gets the section alone."""
    lab_md.parent.mkdir(parents=True, exist_ok=True)
    curves_figure(results, lab_md.parent / FIGURE)
    (lab_md.parent / RESULTS_COPY).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return put_section(lab_md, HEADING, rl_section(results))
