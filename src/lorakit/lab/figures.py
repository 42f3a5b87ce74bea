"""docs/lab.md's figures, drawn from `lab.experiments.run_lab`'s results (and the runs' metrics for curves).

    lab_rank_curves.png   (b) training loss vs step, each all-linear rank and full at its lr (first final seed)
    lab_lr_sweep.png      (c) validation QA loss vs lr per arm (seed 0), the fitted optimum marked
    lab_target_sets.png   (d) training loss vs step of the matched target sets
    lab_forgetting.png    (e) test QA loss vs general-text loss per epoch, one line per trade-off run
    lab_intruders.png     (f) intruder count vs update size, every run of both methods and its random baseline
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lorakit.analysis.plots import plot_rank_curves, plot_targets
from lorakit.lab.claims import lora_ranks, reference
from lorakit.lab.evidence import lattice_lr
from lorakit.lab.forgetting import tradeoff_runs
from lorakit.lab.intruders import EPS
from lorakit.plotting import new_figure, save_figure


def final_rows(results: dict, names: list[str]) -> list[dict]:
    """The first final run of each arm, as sweep rows (method, r, targets, name, lr, losses) for analysis.plots."""
    rows = []
    for name in names:
        arm = results["arms"][name]
        run = arm["finals"][0]
        rows.append({"method": arm["method"], "r": arm["r"], "targets": arm["targets"], "name": run["name"],
                     "lr": run["lr"], "final_train_loss": run["final_train_loss"],
                     "trainable_params": run["trainable_params"]})
    return rows


def lr_figure(results: dict, path: Path) -> Path:
    """(c) validation QA loss against lr, one line per arm; a star at each fitted optimum."""
    figure, (axes,) = new_figure(7.2, 4.4)
    for i, (name, arm) in enumerate(results["arms"].items()):
        lrs = [run["lr"] for run in arm["grid"]]
        scores = [run["validation_loss"] for run in arm["grid"]]
        style = ("-", "--", ":")[i // 10 % 3]  # the colour cycle has 10 colours: past it, another line style
        line = axes.plot(lrs, scores, marker="o", linestyle=style, label=name)[0]
        axes.plot([lattice_lr(arm["fit_k"])], [min(scores)], marker="*", markersize=12, color=line.get_color())
    axes.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="validation QA loss (seed 0)",
             title="learning-rate grids (star: fitted optimum)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    return save_figure(figure, path)


def tradeoff_figure(results: dict, path: Path) -> Path:
    """(e) one line per trade-off run through its epochs, in (test QA loss, general-text loss)."""
    figure, (axes,) = new_figure()
    for name, color in ((reference(results), "tab:blue"), ("full", "tab:red")):
        for i, run in enumerate(tradeoff_runs(results, name)):
            xs = [np.mean(p["test"]) for p in run["epochs"]]
            ys = [np.mean(p["general"]) for p in run["epochs"]]
            axes.plot(xs, ys, marker="o", markersize=3, color=color, alpha=0.4 + 0.6 * (run["k"] == results["arms"]
                      [name]["best_k"]), label=name if i == 0 else None)
    axes.axhline(np.mean(results["base"]["losses"]["general"]), color="grey", linestyle=":", label="base model")
    axes.set(xscale="log", xlabel="test QA loss (lower: learned more)",
             ylabel="general-text loss (higher: forgot more)", title="learning vs forgetting, a point per epoch")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def intruder_figure(results: dict, path: Path) -> Path:
    """(f) intruders at eps 0.5 against update size: each run (filled) and its random update (hollow)."""
    figure, (axes,) = new_figure()
    for name, color in ((reference(results), "tab:blue"), ("full", "tab:red")):
        runs = results["arms"][name]["grid"] + results["arms"][name]["finals"]
        sizes = [run["intruders"]["size"] for run in runs]
        for key, face, label in (("cosines", color, name), ("random_cosines", "none", f"{name}, random update")):
            counts = [sum(1 for c in run["intruders"][key] if c < EPS) for run in runs]
            axes.scatter(sizes, counts, edgecolors=color, facecolors=face, label=label)
    axes.set(xscale="log", xlabel="update size ||dW|| / ||W||", ylabel=f"intruder dimensions (eps {EPS})",
             title="intruders vs update size")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def write_figures(results: dict, work: Path, out: Path) -> None:
    """Every figure of the page into `out`."""
    seed_dir = Path(work) / results["arms"]["full"]["finals"][0]["folder"]
    plot_rank_curves(final_rows(results, lora_ranks(results) + ["full"]), seed_dir, out / "lab_rank_curves.png")
    targets = [name for name in results["arms"] if name.startswith(("attention", "mlp"))] + [reference(results)]
    plot_targets(final_rows(results, targets), seed_dir, out / "lab_target_sets.png")
    lr_figure(results, out / "lab_lr_sweep.png")
    tradeoff_figure(results, out / "lab_forgetting.png")
    intruder_figure(results, out / "lab_intruders.png")
