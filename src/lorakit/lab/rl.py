"""(g) GRPO on the embedded world: is LoRA rank 1 enough for reinforcement learning?

LoRA Without Regret (Schulman et al. 2025) reports that for policy-gradient RL, LoRA matches full fine-tuning
even at rank 1: an episode carries only a few bits. This experiment tests that on the embedded model:

    start   a *weak* SFT model (WEAK_SFT: full fine-tuning stopped early, answers in the right format but often
            wrong), saved as a whole model, so every arm trains from the same weights: the LoRA arms put a fresh
            adapter on it (alpha 32, the lab's ALPHA), the full arm trains all of them.
    splits  the held-out countries are split by country into a validation split (learning-rate choice only)
            and a test split (every reported number); the training countries' questions are GRPO's prompts.
    sweep   each arm (LoRA r1, LoRA r8, full) at each lr of its grid, seed SWEEP_SEED, scored on validation;
            its lr is the one with the highest validation exact match (ties: the smaller lr).
    finals  each arm at its lr, one run per seed of `seeds`, scored on test after every eval_every steps (the
            loop's greedy eval_reward: held-out exact match) and at the end (per question, for the intervals).
    verdict `verdict` (below, a `lab.evidence.Rule`), from a bootstrap over test questions and seeds of rank 1's
            minus full's final test accuracy.

Every run is an ordinary lab sweep cell (`analysis.sweep.run_cell`): one run folder and one cell.json each, so a
killed experiment resumes where it stopped. `run_rl` returns (and writes) results.json; lab/rl_page.py renders it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lorakit.adapters import METHODS
from lorakit.analysis.sweep import PREDICTIONS_FILE, Cell, run_cell
from lorakit.config import load_config
from lorakit.infer.metrics import exact_match
from lorakit.lab import evidence
from lorakit.lab.datasets import read_jsonl, write_jsonl
from lorakit.lab.evidence import Rule, bootstrap_accuracy
from lorakit.lab.experiments import ALPHA
from lorakit.models import EMBEDDED_DATASETS
from lorakit.train.metrics import METRICS_FILE, read_metrics

Log = Callable[[str], None]
RESULTS_FILE = "results.json"
SPLIT_FILES = {"validation": "validation.jsonl", "test": "test.jsonl"}
SWEEP_SEED = 0  # the lr sweep's seed; the finals use other seeds, so no final run repeats a sweep run
MARGIN = 0.05  # |rank-1 minus full| test exact match within which rank 1 "matches" full
# Full fine-tuning of the embedded model for WEAK_SFT_STEPS steps at WEAK_SFT_LR (the quickstart recipe otherwise,
# micro-batch 16, 10 warmup steps, linear decay): measured on the 198 held-out questions, 40 steps at 1e-4 gave
# 12.6%, 60 steps 39.9%, 70 steps 48.5%, 90 steps 70.7% (30 steps at 3e-4: 49.0%). 60 steps: the right format,
# mostly wrong answers, and room for RL to move.
WEAK_SFT_LR, WEAK_SFT_STEPS = 1e-4, 60
ARMS: dict[str, tuple[str, int | None]] = {"lora-r1": ("lora", 1), "lora-r8": ("lora", 8), "full": ("full", None)}


@dataclass(frozen=True)
class RLSettings:
    """How big the experiment is: FULL for docs/lab.md, QUICK for the test (seconds)."""

    sft_steps: int  # the weak SFT's optimizer steps
    steps: int  # GRPO optimizer steps per run
    eval_every: int  # steps between two greedy evaluations (the curves' points)
    num_generations: int  # completions per prompt
    prompts_per_step: int  # training prompts per step (micro_batch_size)
    seeds: tuple[int, ...]  # the finals' seeds
    lr_grid: dict[str, tuple[float, ...]]  # arm -> the lrs of its sweep
    validation_countries: int  # held-out countries in the validation split; the others are the test split
    test_countries: int | None = None  # None: every other held-out country
    bootstrap: int = 2000  # bootstrap resamples of the intervals


LORA_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
FULL = RLSettings(sft_steps=WEAK_SFT_STEPS, steps=150, eval_every=15, num_generations=8, prompts_per_step=8,
                  seeds=(1, 2, 3), lr_grid={"lora-r1": LORA_GRID, "lora-r8": LORA_GRID,
                                            "full": (1e-5, 3e-5, 1e-4, 3e-4)},
                  validation_countries=22)
QUICK = RLSettings(sft_steps=4, steps=2, eval_every=1, num_generations=2, prompts_per_step=2, seeds=(1, 2),
                   lr_grid={"lora-r1": (1e-3, 3e-3), "lora-r8": (1e-3, 3e-3), "full": (1e-5, 1e-4)},
                   validation_countries=2, test_countries=4, bootstrap=200)


def verdict(interval: tuple[float, float], margin: float = MARGIN) -> str:
    """The claim's verdict from the 95% interval of (rank 1 minus full) test accuracy: reproduced when the whole
    interval lies within +-margin (rank 1 matches full); not reproduced when it lies wholly below 0 (rank 1 is
    clearly below) and not within the margin; inconclusive otherwise (too wide, or rank 1 above by more)."""
    return Rule("within", -margin, margin, refute_below=0.0).verdict(interval)


def split_held_out(rows: Sequence[dict], settings: RLSettings) -> dict[str, list[dict]]:
    """{"validation": rows, "test": rows}: the held-out rows split by country (`evidence.split_held_out`)."""
    return evidence.split_held_out(rows, settings.validation_countries, settings.test_countries)


def weak_sft(work: Path, settings: RLSettings, held_out: list[dict], log: Log) -> tuple[dict, Path]:
    """(its cell row, the folder of the whole model) of the weak SFT start, trained unless already there."""
    base = load_config("quickstart", [("train.max_steps", settings.sft_steps), ("train.epochs", settings.sft_steps),
                                      ("train.eval_every", 0), ("train.warmup_steps", min(10, settings.sft_steps // 3))])
    cell = Cell("full", WEAK_SFT_LR)
    row = run_cell(base, cell, work / "weak-sft", qa_rows=held_out, log=log)
    return row, work / "weak-sft" / cell.name / METHODS["full"].output


def grpo_config(start: Path, val_file: Path, settings: RLSettings, seed: int):
    """The grpo-embedded recipe from the weak start (no init adapter), evaluated on `val_file`."""
    return load_config("grpo-embedded", [
        ("model.name_or_path", str(start)), ("model.init_adapter", None), ("data.val_source", str(val_file)),
        ("train.max_steps", settings.steps), ("train.epochs", settings.steps), ("train.seed", seed),
        ("train.eval_every", settings.eval_every), ("train.log_every", settings.eval_every),
        ("train.num_generations", settings.num_generations), ("train.micro_batch_size", settings.prompts_per_step)])


def arm_cell(arm: str, lr: float) -> Cell:
    """The sweep cell of an arm at `lr` (LoRA on every linear layer)."""
    method, r = ARMS[arm]
    return Cell(method, lr, r, "all-linear" if r is not None else None)


def correct(cell_dir: Path) -> dict[str, bool]:
    """{question id: exact match} of a finished cell's predictions."""
    return {f"{row['country']}/{row['kind']}": exact_match(row["prediction"], row["completion"])
            for row in read_jsonl(cell_dir / PREDICTIONS_FILE)}


def curve(cell_dir: Path) -> list[tuple[int, float]]:
    """[(step, greedy held-out exact match)] of the loop's evaluations."""
    return [(record["step"], record["eval_reward"]) for record in read_metrics(cell_dir / METRICS_FILE)
            if "eval_reward" in record]


def choose_lr(sweep: Sequence[dict]) -> float:
    """The lr with the highest validation accuracy (ties: the smaller lr)."""
    return min(sweep, key=lambda row: (-row["validation_accuracy"], row["lr"]))["lr"]


def _sweep_arm(arm: str, start: Path, files: dict[str, Path], splits: dict, settings: RLSettings,
               work: Path, log: Log) -> list[dict]:
    """One validation-scored run per lr of the arm's grid."""
    base = grpo_config(start, files["validation"], settings, SWEEP_SEED)
    rows = []
    for lr in settings.lr_grid[arm]:
        row = run_cell(base, arm_cell(arm, lr), work / "sweep", alpha=ALPHA, qa_rows=splits["validation"], log=log)
        rows.append({"name": row["name"], "lr": lr, "validation_accuracy": row["accuracy"],
                     "validation_curve": curve(work / "sweep" / row["name"]), "wall_time_s": row["wall_time_s"]})
    return rows


def _final_arm(arm: str, lr: float, start: Path, files: dict[str, Path], splits: dict, settings: RLSettings,
               work: Path, log: Log) -> dict:
    """The arm at its lr, one test-scored run per seed: per-seed final accuracy, curves and per-question marks."""
    runs = []
    for seed in settings.seeds:
        folder = work / f"seed{seed}"
        row = run_cell(grpo_config(start, files["test"], settings, seed), arm_cell(arm, lr), folder, alpha=ALPHA,
                       qa_rows=splits["test"], log=log)
        runs.append({"seed": seed, "name": row["name"], "test_accuracy": row["accuracy"],
                     "trainable_params": row["trainable_params"], "wall_time_s": row["wall_time_s"],
                     "test_curve": curve(folder / row["name"]), "correct": correct(folder / row["name"])})
    return {"lr": lr, "runs": runs}


def _marks(runs: Sequence[dict], questions: Sequence[str]) -> np.ndarray:
    return np.array([[float(run["correct"][q]) for q in questions] for run in runs])


def summarize(arms: dict[str, dict], questions: Sequence[str], settings: RLSettings) -> dict:
    """Each arm's mean and interval, the differences to full, and the verdict."""
    marks = {arm: _marks(found["runs"], questions) for arm, found in arms.items()}
    summary = {arm: dict(zip(("mean", "interval"), bootstrap_accuracy(m, None, settings.bootstrap)))
               for arm, m in marks.items()}
    differences = {arm: dict(zip(("mean", "interval"), bootstrap_accuracy(marks[arm], marks["full"],
                                                                           settings.bootstrap)))
                   for arm in marks if arm != "full"}
    return {"accuracy": summary, "minus_full": differences,
            "verdict": verdict(differences["lora-r1"]["interval"]), "margin": MARGIN}


def run_rl(work: Path, settings: RLSettings = FULL, log: Log = print) -> dict:
    """Run (or resume) the whole experiment in `work`; write and return results.json's content."""
    work = Path(work)
    splits = split_held_out(read_jsonl(EMBEDDED_DATASETS["embedded-eval"]), settings)
    files = {name: work / SPLIT_FILES[name] for name in splits}
    for name, rows in splits.items():
        write_jsonl(rows, files[name])
    sft_row, start = weak_sft(work, settings, splits["validation"] + splits["test"], log)
    start_marks = correct(work / "weak-sft" / sft_row["name"])
    questions = [f"{row['country']}/{row['kind']}" for row in splits["test"]]
    sweep = {arm: _sweep_arm(arm, start, files, splits, settings, work, log) for arm in ARMS}
    chosen = {arm: choose_lr(rows) for arm, rows in sweep.items()}
    arms = {arm: _final_arm(arm, chosen[arm], start, files, splits, settings, work, log) for arm in ARMS}
    results = {"settings": dataclasses.asdict(settings), "arms_methods": {a: list(m) for a, m in ARMS.items()},
               "splits": {name: sorted({row["country"] for row in rows}) for name, rows in splits.items()},
               "questions": {name: len(rows) for name, rows in splits.items()},
               "weak_sft": {"name": sft_row["name"], "lr": WEAK_SFT_LR, "steps": settings.sft_steps,
                            "held_out_accuracy": sft_row["accuracy"],
                            **{f"{name}_accuracy": float(np.mean([start_marks[f"{r['country']}/{r['kind']}"]
                                                                  for r in rows]))
                               for name, rows in splits.items()}},
               "sweep": sweep, "chosen_lr": chosen, "arms": arms, **summarize(arms, questions, settings)}
    (work / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results
