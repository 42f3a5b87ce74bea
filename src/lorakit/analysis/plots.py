"""The sweep's figures and tables, from its rows (`cell.json`) and run folders (`metrics.jsonl`).

(a) rank_curves.png   loss vs step (log-log), one curve per LoRA rank at its best lr, full FT
                      as reference: LoRA Without Regret's rank figure
(b) lr_sweep.png      final training loss and held-out loss vs lr, one line per method
(c) target_sets.png   loss vs step for attention-only, MLP-only and all-linear LoRA
(d) forgetting.png    held-out (target-task) loss vs general-text loss, one marker per cell
                      ("LoRA learns less and forgets less", Biderman et al. 2024)
A figure whose cells are missing from the sweep is skipped (its function returns None).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from matplotlib.ticker import NullFormatter, ScalarFormatter

from lorakit.plotting import new_figure, save_figure
from lorakit.train.metrics import METRICS_FILE, read_metrics

COLUMNS = ("name", "method", "r", "targets", "lr", "steps", "trainable_params", "final_train_loss", "eval_loss",
           "general_loss", "accuracy", "train_time_s")


def loss_curve(sweep_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, training loss) of one cell from its metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics(Path(sweep_dir) / name / METRICS_FILE)
            if r.get("loss") is not None]


def best_by(rows: Sequence[dict], key: tuple[str, ...], metric: str = "final_train_loss") -> dict[tuple, dict]:
    """For each value of `key`, the row with the lowest `metric` (its best learning rate)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row.get(metric) is None:
            continue
        group = tuple(row.get(k) for k in key)
        if group not in best or row[metric] < best[group][metric]:
            best[group] = row
    return best


def _plain_ticks(axes) -> None:
    """Log axes with plain numbers on the major ticks and no labels on the minor ones."""
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def _label(row: dict) -> str:
    return row["method"] + (f" r={row['r']}" if row.get("r") is not None else "")


def plot_rank_curves(rows: Sequence[dict], sweep_dir: Path, path: Path) -> Path | None:
    """(a) one curve per rank (all-linear LoRA, best lr per rank) and full fine-tuning."""
    lora = best_by([r for r in rows if r.get("r") is not None and r.get("targets") == "all-linear"], ("method", "r"))
    full = best_by([r for r in rows if r["method"] == "full"], ("method",))
    if len(lora) < 2 and not (lora and full):
        return None
    figure, (axes,) = new_figure()
    for (_, r), row in sorted(lora.items(), key=lambda kv: kv[0][1]):
        axes.plot(*zip(*loss_curve(sweep_dir, row["name"])), label=f"{_label(row)}, lr {row['lr']:.0e}")
    for row in full.values():
        axes.plot(*zip(*loss_curve(sweep_dir, row["name"])), "k--", label=f"full, lr {row['lr']:.0e}")
    axes.set(xscale="log", yscale="log", xlabel="step", ylabel="training loss", title="loss vs step by LoRA rank")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def plot_lr(rows: Sequence[dict], path: Path) -> Path | None:
    """(b) final training loss and held-out loss against lr, one line per method (and rank)."""
    lines: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("targets") in (None, "all-linear"):
            lines.setdefault(_label(row), []).append(row)
    lines = {label: sorted(group, key=lambda r: r["lr"]) for label, group in lines.items() if len(group) > 1}
    if not lines:
        return None
    figure, axes = new_figure(10, 4, ncols=2)
    for axis, metric, title in ((axes[0], "final_train_loss", "final training loss"),
                                (axes[1], "eval_loss", "held-out loss")):
        for label, group in lines.items():
            points = [(r["lr"], r[metric]) for r in group if r.get(metric) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=title, title=f"{title} vs lr")
        axis.grid(alpha=0.3, which="both")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_targets(rows: Sequence[dict], sweep_dir: Path, path: Path) -> Path | None:
    """(c) loss vs step per target set (best lr of each), LoRA at one rank."""
    sets = best_by([r for r in rows if r.get("targets") is not None], ("targets", "r"))
    if len({targets for targets, _ in sets}) < 2:
        return None
    figure, (axes,) = new_figure()
    for (targets, r), row in sorted(sets.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        axes.plot(*zip(*loss_curve(sweep_dir, row["name"])),
                  label=f"{targets} r={r} ({row['trainable_params']:,} params), lr {row['lr']:.0e}")
    axes.set(xscale="log", yscale="log", xlabel="step", ylabel="training loss", title="LoRA target sets")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def plot_forgetting(rows: Sequence[dict], path: Path, base: dict | None = None) -> Path | None:
    """(d) held-out loss (learning) against general-text loss (forgetting), one point per cell."""
    points = [r for r in rows if r.get("general_loss") is not None and r.get("eval_loss") is not None]
    if not points:
        return None
    figure, (axes,) = new_figure()
    for method, marker in (("full", "s"), ("lora", "o")):
        group = [r for r in points if r["method"] == method]
        if group:
            axes.scatter([r["eval_loss"] for r in group], [r["general_loss"] for r in group], marker=marker, label=method)
            for r in group:
                tag = (f"r{r['r']} " if r.get("r") else "") + (f"{r['targets']} " if r.get("targets") not in
                                                                (None, "all-linear") else "")
                axes.annotate(f"{tag}{r['lr']:.0e}",
                              (r["eval_loss"], r["general_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    others = [r for r in points if r["method"] not in ("full", "lora")]
    if others:
        axes.scatter([r["eval_loss"] for r in others], [r["general_loss"] for r in others], marker="^", label="other")
    if base and base.get("general_loss") is not None:
        axes.axhline(base["general_loss"], color="grey", linestyle=":", label="base model, general loss")
    axes.set(xscale="log", yscale="log", xlabel="held-out task loss (lower: learned more)",
             ylabel="general-text loss (higher: forgot more)", title="learning vs forgetting")
    _plain_ticks(axes)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """results.csv: one line per cell, the COLUMNS present in any row."""
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0e}" if value < 0.01 and value > 0 and value == float(f"{value:.0e}") else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table."""
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[dict], sweep_dir: Path, base: dict | None = None) -> dict[str, Path]:
    """results.csv, results.md and every figure that the grid's cells allow, in `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    outputs = {"csv": write_csv(rows, sweep_dir / "results.csv")}
    (sweep_dir / "results.md").write_text(markdown_table(rows))
    outputs["markdown"] = sweep_dir / "results.md"
    figures = {"rank_curves": plot_rank_curves(rows, sweep_dir, sweep_dir / "rank_curves.png"),
               "lr_sweep": plot_lr(rows, sweep_dir / "lr_sweep.png"),
               "target_sets": plot_targets(rows, sweep_dir, sweep_dir / "target_sets.png"),
               "forgetting": plot_forgetting(rows, sweep_dir / "forgetting.png", base)}
    outputs.update({name: p for name, p in figures.items() if p is not None})
    return outputs


def spectra_figure(spectra: Sequence, path: Path, title: str = "") -> Path:
    """Left: normalised singular values of dW per module; right: intruders per module (analysis/spectral.py)."""
    figure, (left, right) = new_figure(11, 4.2, ncols=2)
    for m in spectra:
        s = m.delta_singular_values
        if s and s[0] > 0:
            left.plot(range(1, len(s) + 1), [v / s[0] for v in s], alpha=0.5, linewidth=1)
    left.set(xscale="log", yscale="log", ylim=(1e-4, 1.5), xlabel="index", ylabel="s_i / s_1 of dW",
             title="singular values of the update, per module")
    left.grid(alpha=0.3, which="both")
    right.bar(range(len(spectra)), [len(m.intruders) for m in spectra])
    right.set(xlabel="module (model order)", ylabel="intruder dimensions", title="intruders per module")
    figure.suptitle(title)
    return save_figure(figure, path)
