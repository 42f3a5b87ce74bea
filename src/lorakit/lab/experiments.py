"""The lab's experiments on the embedded model: which cells docs/lab.md is written from.

`run_lab(work_dir)` scores the base model once (`base.json`) and runs the sweep cells below
(resumable: completed cells are skipped). Every cell is LoRA (alpha 32 fixed, so the update is
scaled by 32 / r as in LoRA Without Regret) or full fine-tuning of the embedded model on the
embedded QA set, scored on the held-out countries (accuracy, QA loss) and on fresh
pre-training-style text (general loss: forgetting).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit.analysis.sweep import Cell, run_sweep
from lorakit.config import load_config
from lorakit.infer.evaluate import evaluate
from lorakit.lab.datasets import read_jsonl
from lorakit.models import EMBEDDED_DATASETS, load_model, load_tokenizer

ALPHA = 32.0
EPOCHS = 6  # the quickstart's: fewer epochs leave low-lr runs on the same-answer plateau
LORA_LR = 1e-3
# (b) rank sweep, each rank at three lrs (its best is compared), (c) lr sweep of LoRA r16 and of
# full fine-tuning, (d) target sets
LAB_CELLS: tuple[Cell, ...] = (
    *(Cell("lora", LORA_LR, r, "all-linear") for r in (1, 4, 16, 64)),
    *(Cell("lora", lr, 16, "all-linear") for lr in (1e-4, 3e-4, 3e-3, 1e-2)),
    *(Cell("full", lr) for lr in (3e-5, 1e-4, 3e-4, 1e-3)),
    *(Cell("lora", LORA_LR, 16, targets) for targets in ("attention", "mlp")),
    *(Cell("lora", lr, r, "all-linear") for r in (1, 4, 64) for lr in (3e-4, 3e-3)),
)
BASE_FILE = "base.json"


def lab_config(epochs: int = EPOCHS) -> Any:
    """The quickstart recipe with `epochs` passes, no mid-run evaluation and dense loss logging."""
    cfg = load_config("quickstart")
    train = dataclasses.replace(cfg.train, epochs=epochs, eval_every=0, log_every=2)
    return dataclasses.replace(cfg, train=train)


def lab_rows() -> tuple[list[dict], list[dict]]:
    """(held-out QA rows, general-text rows) of the embedded datasets."""
    return read_jsonl(EMBEDDED_DATASETS["embedded-eval"]), read_jsonl(EMBEDDED_DATASETS["embedded-general"])


def score_base(work_dir: Path) -> dict:
    """Accuracy, QA loss and general loss of the untuned embedded model (cached in base.json)."""
    path = Path(work_dir) / BASE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    qa_rows, general_rows = lab_rows()
    model, tokenizer = load_model("embedded"), load_tokenizer("embedded")
    qa = evaluate(model, tokenizer, qa_rows, max_new_tokens=16, batch_size=64)
    base = {"accuracy": qa["exact_match"], "contains": qa["contains"], "qa_loss": qa["loss"],
            "general_loss": evaluate(model, tokenizer, general_rows, batch_size=64)["loss"],
            "predictions": qa["predictions"]}
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base, indent=2) + "\n")
    return base


def run_lab(work_dir: Path, epochs: int = EPOCHS, log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """(base scores, one row per lab cell), training whatever is not complete yet."""
    base = score_base(work_dir)
    qa_rows, general_rows = lab_rows()
    rows = run_sweep(lab_config(epochs), LAB_CELLS, Path(work_dir) / "sweep", alpha=ALPHA,
                     general_rows=general_rows, qa_rows=qa_rows, log=log)
    return base, rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_lab(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lab"))
