"""What a run leaves behind besides weights: metrics.jsonl, loss_curve.png, summary.json."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from lorakit.plotting import new_figure, save_figure

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainSummary:
    """The closing numbers of a run (also written as run_dir/summary.json)."""

    steps: int  # optimizer steps completed (including those before a resume)
    epochs: float  # epochs completed, fractional
    trainable_params: int
    total_params: int
    wall_time_s: float  # training time summed over all resumed segments
    tokens_per_s: float  # input positions (padding included) per second of training
    trained_tokens: int  # tokens that carried a loss (labels != -100), cumulative
    final_loss: float | None  # mean training loss of the last logged interval
    final_eval_loss: float | None
    best_eval_loss: float | None
    best_eval_step: int | None
    micro_batch_parts: int  # pieces each micro-batch was split into after out-of-memory errors (1 = none)
    resumed_from: str | None  # checkpoint folder this process resumed from

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return asdict(self)


class MetricsLog:
    """Append-only JSON-lines metrics file, flushed after every record so a killed run keeps them."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            truncate_after(path, resume_step)
        self.records = read_metrics(path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records up to `step`, so a resumed run's file equals an uninterrupted one's."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def loss_figure(records: list[dict[str, Any]], title: str = "loss", size: tuple[float, float] = (6, 4),
                log_y: bool = False) -> Any:
    """Train loss per logged step and eval loss per evaluation against the optimizer step, on one axes with
    ticks, axis labels and a legend (the run folder's PNG and the HTML report draw this one figure). `log_y`: a
    log loss axis (ticks at 1, 2, 5 per decade) when the losses span a factor of 10 or more."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    figure, (axes,) = new_figure(*size)
    losses = [loss for _, loss in train + evals]
    if log_y and losses and min(losses) > 0 and max(losses) >= 10 * min(losses):
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.yaxis.set_minor_formatter(NullFormatter())
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1.5)
    if evals:
        axes.plot(*zip(*evals), label="eval", marker="o", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean per trained token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if train or evals:
        axes.legend()
    return figure


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "loss") -> None:
    """Train and eval loss against step, as a PNG."""
    save_figure(loss_figure(records, title), path)


def write_summary(summary: TrainSummary, path: Path) -> None:
    """summary.json, pretty-printed."""
    path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
