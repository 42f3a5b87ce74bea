"""The sections of docs/lab.md: each lecture claim, the lab's numbers, and a computed verdict.

Verdict rules are written next to each section so a reader can check them; every number comes
from the sweep rows (`cell.json` of each run) and the base model's scores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lorakit.lab.experiments import ALPHA, EPOCHS, LORA_LR

REGENERATE = "lorakit lab-report --out docs --work runs/lab"


def find(rows: Sequence[dict], method: str, r: int | None = None, targets: str | None = None,
         lr: float | None = None) -> list[dict]:
    """Rows matching the given cell fields (None: any)."""
    return [row for row in rows if row["method"] == method and (r is None or row.get("r") == r)
            and (targets is None or row.get("targets") == targets)
            and (lr is None or abs(row["lr"] - lr) < 1e-12)]


def best(rows: Sequence[dict], metric: str) -> dict:
    """The row with the lowest `metric`."""
    return min((row for row in rows if row.get(metric) is not None), key=lambda row: row[metric])


def reference_cells(rows: Sequence[dict]) -> dict[str, dict]:
    """LoRA r16 and r64 (all-linear, lab lr) and full fine-tuning at its best held-out loss."""
    cells = {f"lora_r{r}": find(rows, "lora", r, "all-linear", LORA_LR) for r in (16, 64)}
    cells = {label: found[0] for label, found in cells.items() if found}
    full = find(rows, "full")
    if full:
        cells["full"] = best(full, "eval_loss")
    return cells


def _verdict(ok: bool | None) -> str:
    return {True: "**Reproduced.**", False: "**Not reproduced.**", None: "**Partly reproduced.**"}[ok]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def header(rows: Sequence[dict]) -> str:
    """What was run, how, and how to run it again."""
    lora_params = {row["r"]: row["trainable_params"] for row in rows if row.get("targets") == "all-linear"}
    total = next((row["trainable_params"] for row in rows if row["method"] == "full"), None)
    return "\n".join([
        "# The lecture's claims at small scale: the embedded lab",
        "",
        f"Regenerate this page (and its figures) with `{REGENERATE}` (resumable; about 12 minutes on one CPU thread).",
        "",
        f"- Model: the embedded Llama-shaped model (hidden 128, 4 layers, {total:,} parameters), pre-trained on "
        "documents about countries; it has never seen a question.",
        "- Fine-tuning data: the embedded question/answer set (600 rows about 60% of the countries). Held-out set: "
        "198 questions about the other countries, answerable only from pre-training. General text: 200 fresh "
        "pre-training-style documents (forgetting).",
        f"- Every run: {EPOCHS} epochs, micro-batch 16, linear decay after 10 warmup steps, AdamW, fp32, "
        f"seed 0 (one seed per cell: differences of a few percent are within noise). LoRA alpha is fixed at "
        f"{ALPHA:.0f}, so the update is scaled by {ALPHA:.0f}/r (LoRA Without Regret's choice).",
        f"- {len(rows)} runs. LoRA trainable parameters by rank (all-linear): "
        + ", ".join(f"r={r}: {n:,}" for r, n in sorted(lora_params.items())) + ".",
    ])


def _load_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def base_vs_sft(base: dict, rows: Sequence[dict], sweep_dir: Path, shown: int = 8) -> str:
    """(a) held-out accuracy and a few answers before and after fine-tuning."""
    cells = reference_cells(rows)
    lora, full = cells.get("lora_r16"), cells.get("full")
    lines = ["## (a) Base model vs fine-tuned: held-out questions", "",
             "Claim: pre-training teaches knowledge, post-training teaches behaviour; a little SFT makes a model "
             "that only continues text answer questions about facts it read, including facts never asked about "
             "in fine-tuning.", "",
             "| model | held-out exact match | held-out QA loss | general-text loss |", "|---|---:|---:|---:|",
             f"| base | {_pct(base['accuracy'])} | {base['qa_loss']:.3f} | {base['general_loss']:.3f} |"]
    for label, row in (("LoRA r16", lora), ("full", full)):
        if row:
            lines.append(f"| {label} ({row['name']}) | {_pct(row['accuracy'])} | {row['eval_loss']:.3f} | "
                         f"{row['general_loss']:.3f} |")
    if lora:
        predictions = {label: _load_predictions(sweep_dir / row["name"] / "predictions.jsonl")
                       for label, row in (("lora", lora), ("full", full)) if row}
        lines += ["", "| question | reference | base | LoRA r16 | full |", "|---|---|---|---|---|"]
        count = len(predictions["lora"])
        for i in [(k * count) // shown + k % 3 for k in range(shown)]:  # spread over countries and kinds
            row = predictions["lora"][i]
            cells = [row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:"), row["completion"],
                     base["predictions"][i], row["prediction"],
                     predictions["full"][i]["prediction"] if "full" in predictions else ""]
            lines.append("| " + " | ".join(" ".join(c.split())[:50].replace("|", "/") for c in cells) + " |")
        ok = lora["accuracy"] > base["accuracy"] + 0.5
        lines += ["", f"{_verdict(ok)} The base model answers {_pct(base['accuracy'])} of the held-out questions "
                  f"(it continues the text instead); after LoRA SFT {_pct(lora['accuracy'])}"
                  + (f", after full SFT {_pct(full['accuracy'])}" if full else "") + "."]
    return "\n".join(lines)


def rank_section(rows: Sequence[dict]) -> str:
    """(b) loss vs step by rank, full fine-tuning as reference."""
    by_rank: dict[int, list[dict]] = {}
    for row in find(rows, "lora", targets="all-linear"):
        by_rank.setdefault(row["r"], []).append(row)
    lora = [best(group, "final_train_loss") for _, group in sorted(by_rank.items())]  # each rank at its best lr
    full = find(rows, "full")
    lines = ["## (b) Rank sweep", "",
             "Claim (LoRA Without Regret, Schulman et al. 2025): with enough rank LoRA follows full fine-tuning's "
             "learning curve; low ranks fall behind once the data exceed their capacity.", "",
             "![loss vs step by rank](lab_rank_curves.png)", "",
             "Each rank at its best learning rate (lowest final training loss) among those tried: "
             + "; ".join(f"r={r}: " + ", ".join(f"{row['lr']:.0e}" for row in sorted(group, key=lambda x: x["lr"]))
                         for r, group in sorted(by_rank.items())) + ". Full fine-tuning at every lr tried.", "",
             "| run | trainable params | final train loss | held-out loss | held-out accuracy |",
             "|---|---:|---:|---:|---:|"]
    for row in lora + sorted(full, key=lambda row: row["lr"]):
        lines.append(f"| {row['name']} | {row['trainable_params']:,} | {row['final_train_loss']:.4f} | "
                     f"{row['eval_loss']:.4f} | {_pct(row['accuracy'])} |")
    if lora and full:
        top, low, ref = lora[-1], lora[0], best(full, "final_train_loss")
        gap = top["final_train_loss"] / ref["final_train_loss"]
        ordered = all(a["final_train_loss"] >= b["final_train_loss"] * 0.9 for a, b in zip(lora, lora[1:]))
        ok = True if gap < 1.5 and ordered else (None if ordered or gap < 1.5 else False)
        lines += ["", f"{_verdict(ok)} Rule: reproduced when the highest rank ends within 1.5x of full "
                  "fine-tuning's training loss and loss falls (within 10%) as rank grows. Here r="
                  f"{top['r']} ends at {top['final_train_loss']:.4f} vs full's {ref['final_train_loss']:.4f} "
                  f"({ref['name']}): {gap:.1f}x; r={low['r']} ends at {low['final_train_loss']:.4f}. Loss "
                  f"{'does' if ordered else 'does not'} fall monotonically with rank. Held-out loss (what the "
                  f"task needs): r={low['r']} {low['eval_loss']:.4f}, r={top['r']} {top['eval_loss']:.4f}, full "
                  f"at its best lr {best(full, 'eval_loss')['eval_loss']:.4f}."]
    return "\n".join(lines)


def lr_section(rows: Sequence[dict]) -> str:
    """(c) final loss vs learning rate, LoRA vs full."""
    lora = sorted(find(rows, "lora", 16, "all-linear"), key=lambda row: row["lr"])
    full = sorted(find(rows, "full"), key=lambda row: row["lr"])
    lines = ["## (c) Learning-rate sweep, LoRA vs full", "",
             "Claim (LoRA Without Regret): LoRA's best learning rate is about 10x full fine-tuning's.", "",
             "![final loss vs learning rate](lab_lr_sweep.png)", "",
             "| method | lr | final train loss | held-out loss | held-out accuracy | general-text loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in lora + full:
        lines.append(f"| {row['method']}{' r16' if row.get('r') else ''} | {row['lr']:.0e} | "
                     f"{row['final_train_loss']:.4f} | {row['eval_loss']:.4f} | {_pct(row['accuracy'])} | "
                     f"{row['general_loss']:.3f} |")
    if lora and full:
        ratios = {metric: best(lora, metric)["lr"] / best(full, metric)["lr"]
                  for metric in ("final_train_loss", "eval_loss")}
        ok_all = [5 <= ratio <= 20 for ratio in ratios.values()]
        near = [2.5 <= ratio <= 40 for ratio in ratios.values()]
        ok = True if all(ok_all) else (None if any(ok_all) or all(near) else False)
        lines += ["", f"{_verdict(ok)} Rule: reproduced when the ratio of best learning rates is 5-20x on both "
                  "metrics, partly when one metric gives that or both are within one grid step (2.5-40x). "
                  f"Best lr by final training loss: LoRA {best(lora, 'final_train_loss')['lr']:.0e}, full "
                  f"{best(full, 'final_train_loss')['lr']:.0e} (ratio {ratios['final_train_loss']:.1f}x); by "
                  f"held-out loss: LoRA {best(lora, 'eval_loss')['lr']:.0e}, full "
                  f"{best(full, 'eval_loss')['lr']:.0e} (ratio {ratios['eval_loss']:.1f}x). The grid has steps "
                  "of about 3x, so a ratio is known to within a factor of ~3." + _edges(lora, full)]
    return "\n".join(lines)


def _edges(lora: Sequence[dict], full: Sequence[dict]) -> str:
    """A warning for each best lr that sits at the end of its grid (the true optimum may lie beyond)."""
    notes = []
    for label, group in (("LoRA", lora), ("full", full)):
        lrs = sorted(row["lr"] for row in group)
        for metric, name in (("final_train_loss", "training"), ("eval_loss", "held-out")):
            lr = best(group, metric)["lr"]
            if lr in (lrs[0], lrs[-1]):
                notes.append(f" {label}'s best lr by {name} loss ({lr:.0e}) is at the end of its grid, so its "
                             "true best may lie beyond it.")
    return "".join(notes)


def targets_section(rows: Sequence[dict]) -> str:
    """(d) attention-only vs MLP-only vs all-linear LoRA."""
    sets = {t: find(rows, "lora", 16, t, LORA_LR) for t in ("attention", "mlp", "all-linear")}
    sets = {t: found[0] for t, found in sets.items() if found}
    lines = ["## (d) Target sets", "",
             "Claim (LoRA Without Regret): attention-only LoRA underperforms; MLP-only does about as well as "
             "all-linear.", "", "![target sets](lab_target_sets.png)", "",
             "| targets | trainable params | final train loss | held-out loss | held-out accuracy |",
             "|---|---:|---:|---:|---:|"]
    for t, row in sets.items():
        lines.append(f"| {t} | {row['trainable_params']:,} | {row['final_train_loss']:.4f} | "
                     f"{row['eval_loss']:.4f} | {_pct(row['accuracy'])} |")
    if len(sets) == 3:
        att, mlp, every = sets["attention"], sets["mlp"], sets["all-linear"]
        att_worse = att["final_train_loss"] > mlp["final_train_loss"] and att["eval_loss"] > mlp["eval_loss"]
        mlp_close = mlp["final_train_loss"] <= 1.5 * every["final_train_loss"]
        ok = True if att_worse and mlp_close else (None if att_worse or mlp_close else False)
        lines += ["", f"{_verdict(ok)} Rule: attention-only must be worse than MLP-only on both training and "
                  "held-out loss, and MLP-only within 1.5x of all-linear's training loss. Attention-only is "
                  f"{'worse' if att_worse else 'not worse'} than MLP-only (train {att['final_train_loss']:.4f} vs "
                  f"{mlp['final_train_loss']:.4f}, held-out {att['eval_loss']:.4f} vs {mlp['eval_loss']:.4f}); "
                  f"MLP-only's training loss is {mlp['final_train_loss'] / every['final_train_loss']:.1f}x "
                  "all-linear's. All three at one lr and rank 16, so they differ in parameter count too. This "
                  "task (turning stored facts into answers) may lean on attention more than the "
                  "knowledge-heavy fine-tuning of the claim."]
    return "\n".join(lines)


def _frontier(rows: Sequence[dict], floor: float) -> dict | None:
    """The row with the lowest general loss among those reaching `floor` held-out accuracy."""
    reached = [row for row in rows if row["accuracy"] >= floor]
    return min(reached, key=lambda row: row["general_loss"]) if reached else None


def _lr_forgetting(rows: Sequence[dict], label: str) -> str:
    """Whether a method's highest-lr run is also its most-forgetting run."""
    top_lr = max(rows, key=lambda row: row["lr"])
    most = max(rows, key=lambda row: row["general_loss"])
    relation = "is" if top_lr is most else "is not"
    return (f"{label}'s highest lr ({top_lr['name']}, general loss {top_lr['general_loss']:.3f}) {relation} "
            f"its most-forgetting run ({most['name']}, {most['general_loss']:.3f}).")


def forgetting_section(base: dict, rows: Sequence[dict]) -> str:
    """(e) learning vs forgetting, LoRA vs full."""
    lora, full = find(rows, "lora"), find(rows, "full")
    lines = ["## (e) Forgetting, LoRA vs full", "",
             "Claim (Biderman et al. 2024, \"LoRA Learns Less and Forgets Less\"): full fine-tuning learns the "
             "target task better; LoRA keeps more of the base model's other abilities.", "",
             "![learning vs forgetting](lab_forgetting.png)", "",
             f"General-text loss of the base model: {base['general_loss']:.3f}. Every run's numbers are in the "
             "tables above and below."]
    if not (lora and full):
        return "\n".join(lines)
    learn_lora, learn_full = best(lora, "eval_loss"), best(full, "eval_loss")
    learns_less = learn_lora["eval_loss"] > learn_full["eval_loss"]
    lines += ["", "| held-out accuracy at least | LoRA: lowest general loss (run) | full: lowest general loss (run) |",
              "|---:|---|---|"]
    forgets_less = []
    for floor in (0.85, 0.90, 0.93):
        a, b = _frontier(lora, floor), _frontier(full, floor)
        show = lambda row: f"{row['general_loss']:.3f} ({row['name']})" if row else "none reached it"  # noqa: E731
        lines.append(f"| {_pct(floor)} | {show(a)} | {show(b)} |")
        if a and b:
            forgets_less.append(a["general_loss"] < b["general_loss"])
    ok = True if learns_less and forgets_less and all(forgets_less) else (
        None if learns_less or any(forgets_less) else False)
    lines += ["", f"{_verdict(ok)} Rule: LoRA's best held-out loss must be worse than full's (learns less) and, "
              "at each accuracy level both reach, LoRA's least forgetting run must forget less. Learns less: "
              f"{'yes' if learns_less else 'no'} (best held-out loss LoRA {learn_lora['eval_loss']:.4f}, "
              f"{learn_lora['name']}; full {learn_full['eval_loss']:.4f}, {learn_full['name']}). Forgets less at "
              f"matched accuracy: {sum(forgets_less)} of {len(forgets_less)} levels. "
              + " ".join(_lr_forgetting(group, label) for label, group in (("LoRA", lora), ("Full", full)))]
    return "\n".join(lines)


def intruder_section(spectra: dict[str, dict]) -> str:
    """(f) intruder dimensions, LoRA vs full."""
    lines = ["## (f) Intruder dimensions, LoRA vs full", "",
             "Claim (Shuttleworth et al. 2024, \"LoRA vs Full Fine-tuning: An Illusion of Equivalence\"): LoRA "
             "creates intruder dimensions, new high-ranking singular vectors unlike any of the base weight's; "
             "full fine-tuning barely does. Measured with `lorakit inspect` (top 10 singular vectors, "
             "|cos| < 0.5), on the 28 linear layers.", "",
             "| run | modules with intruders | intruders in all | mean effective rank of dW | figure |",
             "|---|---:|---:|---:|---|"]
    counts = {}
    for label, item in spectra.items():
        modules = item["spectra"]
        counts[label] = sum(len(m.intruders) for m in modules)
        rank = sum(m.effective_rank for m in modules) / max(len(modules), 1)
        lines.append(f"| {item['row']['name']} | {sum(1 for m in modules if m.intruders)} of {len(modules)} | "
                     f"{counts[label]} | {rank:.1f} | ![{label}](intruders_{label}.png) |")
    if "full" in counts and "lora_r16" in counts:
        ok = counts["lora_r16"] > counts["full"] and counts["full"] <= 2
        lines += ["", f"{_verdict(ok)} Rule: LoRA r16 must show more intruders than full fine-tuning, and full "
                  f"at most 2. LoRA r16: {counts['lora_r16']}, full: {counts['full']}"
                  + (f", LoRA r64: {counts['lora_r64']}" if "lora_r64" in counts else "") + "."]
    return "\n".join(lines)
