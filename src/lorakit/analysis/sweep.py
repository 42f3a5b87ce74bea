"""Grids of short trainings: rank x learning rate x method x target set, one run folder per cell.

Every cell is an ordinary `lorakit.run.run_training` run in `SWEEP_DIR/<cell name>/`, scored
after training (validation loss, optional loss on a second "general" dataset to measure
forgetting, optional held-out accuracy) into `cell.json`. A cell with a `cell.json` is complete
and skipped on the next call, so a killed sweep resumes where it stopped; a cell folder without
one (killed mid-run) is trained again from scratch.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from safetensors.torch import load_file

from lorakit.adapters import METHODS
from lorakit.analysis.targets import resolve_target_set, skeleton_model
from lorakit.errors import ConfigError
from lorakit.infer.evaluate import evaluate
from lorakit.infer.metrics import example_losses, scored_ids
from lorakit.run import pad_id_of, run_training
from lorakit.train.checkpoint import load_trainable_state, step_dirs
from lorakit.train.metrics import METRICS_FILE, read_metrics

CELL_FILE = "cell.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOSSES_FILE = "losses.json"  # {row set: [mean token loss of each row]} after training
CHECKPOINTS_FILE = "checkpoints.json"  # [{"step": N, row set: [losses]}] at each checkpoint of the run
Log = Callable[[str], None]


@dataclass(frozen=True)
class Cell:
    """One point of the grid. `r` and `targets` apply to methods that have them (not `full`)."""

    method: str  # a name in lorakit.adapters.METHODS, e.g. "lora" or "full"
    lr: float
    r: int | None = None
    targets: str | None = None  # a target-set name: all-linear, attention, mlp

    @property
    def name(self) -> str:
        """Folder name, e.g. 'lora-r16-all-linear-lr1e-03' or 'full-lr3e-04'."""
        parts = [self.method]
        if self.r is not None:
            parts.append(f"r{self.r}")
        if self.targets is not None:
            parts.append(self.targets)
        return "-".join(parts + [f"lr{lr_text(self.lr)}"])


def lr_text(lr: float) -> str:
    """The shortest exponent form that gives `lr` back: 1e-03, 2.5e-04, 1.25e-04 (at most 3 digits)."""
    for digits in range(3):
        text = f"{lr:.{digits}e}"
        if float(text) == lr:
            return text
    return f"{lr:.2e}"


def method_fields(method: str) -> set[str]:
    """Field names of a registered method's config class."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(sorted(METHODS))}")
    return {f.name for f in dataclasses.fields(METHODS[method])}


def grid(methods: Sequence[str], ranks: Sequence[int], lrs: Sequence[float],
         target_sets: Sequence[str]) -> list[Cell]:
    """The product grid; a method without rank/targets (e.g. full) gets one cell per lr only."""
    cells: list[Cell] = []
    for method in methods:
        fields = method_fields(method)
        for r in (ranks if "r" in fields else [None]):
            for targets in (target_sets if "targets" in fields else [None]):
                cells += [Cell(method, float(lr), r, targets) for lr in lrs]
    return list(dict.fromkeys(cells))


def method_config(cell: Cell, base_method: Any, model_name: str, alpha: float | None) -> Any:
    """The method config of a cell; LoRA-like methods keep the base config's other fields."""
    cls = METHODS[cell.method]
    fields = method_fields(cell.method)
    values = dataclasses.asdict(base_method) if type(base_method) is cls else {}
    if cell.r is not None:
        values["r"] = cell.r
    if alpha is not None and "alpha" in fields:
        values["alpha"] = alpha
    if cell.targets is not None:
        values["targets"] = resolve_target_set(cell.targets, skeleton_model(model_name))
    return cls(**{k: v for k, v in values.items() if k in fields})


def cell_config(base: Any, cell: Cell, sweep_dir: Path, alpha: float | None = None) -> Any:
    """The RunConfig of one cell: the base config with the cell's method and lr, in its own folder."""
    method = method_config(cell, base.method, base.model.name_or_path, alpha)
    train = dataclasses.replace(base.train, lr=cell.lr, progress="none")
    return dataclasses.replace(base, method=method, train=train, name=cell.name, output_dir=str(sweep_dir))


def read_cell(cell_dir: Path) -> dict | None:
    """The scores of a completed cell, or None."""
    path = Path(cell_dir) / CELL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _score(model: Any, tokenizer: Any, general_rows: list[dict] | None, qa_rows: list[dict] | None,
           cell_dir: Path) -> dict:
    """Loss on the general rows (forgetting) and held-out accuracy on the QA rows, when given."""
    model.eval()
    scores: dict = {}
    if general_rows:
        scores["general_loss"] = evaluate(model, tokenizer, general_rows, batch_size=64)["loss"]
    if qa_rows:
        qa = evaluate(model, tokenizer, qa_rows, max_new_tokens=16, batch_size=64)
        scores.update(accuracy=qa["exact_match"], contains=qa["contains"], qa_loss=qa["loss"])
        with (cell_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as handle:
            for row, answer in zip(qa_rows, qa["predictions"]):
                handle.write(json.dumps({**row, "prediction": answer}, ensure_ascii=False) + "\n")
    return scores


def row_losses(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 64) -> list[float]:
    """Mean token loss of each row, scored as `evaluate` scores them: the completion (plus EOS) of a
    prompt/completion row, every token of a text row."""
    examples = []
    for row in rows:
        pair = ("", str(row["text"])) if "completion" not in row else (row["prompt"], row["completion"])
        ids, labels = scored_ids(tokenizer, *pair)
        examples.append({"input_ids": ids, "labels": labels})
    sums = example_losses(model, examples, pad_id_of(tokenizer), batch_size=batch_size)
    return [total / max(count, 1) for total, count in sums]


def _score_rows(model: Any, tokenizer: Any, loss_rows: Mapping[str, Sequence[dict]]) -> dict[str, list[float]]:
    model.eval()
    return {name: row_losses(model, tokenizer, rows) for name, rows in loss_rows.items()}


def _score_checkpoints(model: Any, tokenizer: Any, loss_rows: Mapping[str, Sequence[dict]], cell_dir: Path) -> None:
    """Score `loss_rows` at every checkpoint of the run (into CHECKPOINTS_FILE), then delete the checkpoints."""
    root = cell_dir / "checkpoints"
    if not root.is_dir():
        return
    points = []
    for folder in step_dirs(root):
        load_trainable_state(model, load_file(folder / "trainable.safetensors"), folder)
        points.append({"step": int(folder.name.removeprefix("step-")), **_score_rows(model, tokenizer, loss_rows)})
    (cell_dir / CHECKPOINTS_FILE).write_text(json.dumps(points) + "\n")
    shutil.rmtree(root)


def final_train_loss(records: list[dict], tail: float = 0.1) -> float | None:
    """Mean training loss over the last `tail` fraction of logged steps (at least one record)."""
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    if not losses:
        return None
    count = max(1, round(tail * len(losses)))
    return sum(losses[-count:]) / count


def run_cell(base: Any, cell: Cell, sweep_dir: Path, *, alpha: float | None = None,
             general_rows: list[dict] | None = None, qa_rows: list[dict] | None = None,
             loss_rows: Mapping[str, Sequence[dict]] | None = None, log: Log = print) -> dict:
    """Train and score one cell (or read it back when already complete); returns its row. `loss_rows`: named
    row sets scored row by row (LOSSES_FILE), and at each checkpoint the run wrote (CHECKPOINTS_FILE)."""
    cell_dir = Path(sweep_dir) / cell.name
    done = read_cell(cell_dir)
    if done is not None:
        log(f"skip {cell.name}: already complete")
        return done
    if cell_dir.exists():
        log(f"restart {cell.name}: its folder holds no {CELL_FILE} (interrupted)")
        shutil.rmtree(cell_dir)
    started = time.perf_counter()
    cfg = cell_config(base, cell, Path(sweep_dir), alpha)
    result = run_training(cfg, log=lambda line: None)
    s = result.summary
    row = {**dataclasses.asdict(cell), "name": cell.name, "steps": s.steps,
           "trainable_params": s.trainable_params, "total_params": s.total_params,
           "final_train_loss": final_train_loss(read_metrics(cell_dir / METRICS_FILE)),
           "eval_loss": s.final_eval_loss, "train_time_s": s.wall_time_s}
    row.update(_score(result.model, result.tokenizer, general_rows, qa_rows, cell_dir))
    if loss_rows:
        (cell_dir / LOSSES_FILE).write_text(json.dumps(_score_rows(result.model, result.tokenizer, loss_rows)) + "\n")
        _score_checkpoints(result.model, result.tokenizer, loss_rows, cell_dir)
    row["wall_time_s"] = time.perf_counter() - started
    (cell_dir / CELL_FILE).write_text(json.dumps(row, indent=2) + "\n")
    log(f"done {cell.name}: train loss {row['final_train_loss']:.4f} in {row['wall_time_s']:.0f} s")
    return row


def run_sweep(base: Any, cells: Sequence[Cell], sweep_dir: Path, *, alpha: float | None = None,
              general_rows: list[dict] | None = None, qa_rows: list[dict] | None = None,
              log: Log = print) -> list[dict]:
    """Run (or skip) every cell in order; returns one row per cell."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, cell in enumerate(cells, 1):
        log(f"[{index}/{len(cells)}] {cell.name}")
        rows.append(run_cell(base, cell, sweep_dir, alpha=alpha, general_rows=general_rows,
                             qa_rows=qa_rows, log=log))
    return rows
