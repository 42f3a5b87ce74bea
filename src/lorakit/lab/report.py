"""The quickstart's report: base vs tuned, as plain text for the terminal and Markdown on disk."""
from __future__ import annotations

from collections.abc import Sequence

from lorakit.infer.metrics import exact_match


def accuracy_by_kind(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy overall ("all") and per question kind (capital, continent, ...)."""
    groups: dict[str, list[bool]] = {"all": []}
    for row, prediction in zip(rows, predictions):
        right = exact_match(prediction, row["completion"])
        groups["all"].append(right)
        groups.setdefault(row.get("kind", "other"), []).append(right)
    return {kind: sum(marks) / len(marks) for kind, marks in groups.items() if marks}


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _question(prompt: str) -> str:
    return prompt.removeprefix("Question: ").removesuffix("\nAnswer:")


def _times(trainable: int, total: int) -> str:
    return f"{total / trainable:,.0f}x fewer" if trainable else "none trainable"


def terminal_report(report: dict) -> str:
    """The side-by-side demo as lines for the terminal."""
    lines = ["", "Held-out questions (countries never asked about in fine-tuning):", ""]
    for item in report["examples"]:
        lines.append(f"  Q: {_question(item['prompt'])}   (reference: {item['reference'].strip()})")
        lines.append(f"     base : {_clip(item['base'])!r}")
        lines.append(f"     tuned: {_clip(item['tuned'])!r}")
    base, tuned = report["base"]["accuracy"], report["tuned"]["accuracy"]
    lines += ["", f"  {'held-out exact match':<26}{'base':>8}{'tuned':>8}"]
    for kind in tuned:
        lines.append(f"  {'  ' * (kind != 'all') + kind:<26}{base.get(kind, 0):>8.1%}{tuned[kind]:>8.1%}")
    params, train = report["parameters"], report["training"]
    lines += [
        "",
        f"  trainable parameters  {params['trainable']:,} of {params['total']:,} "
        f"({params['trainable'] / params['total']:.2%}; {_times(params['trainable'], params['total'])})",
        f"  training              {train['steps']} steps in {train['wall_time_s']:.1f} s, "
        f"{train['tokens_per_s']:,.0f} tokens/s",
        f"  forgetting            general-text loss {report['base']['general_loss']:.3f} (base) -> "
        f"{report['tuned']['general_loss']:.3f} (tuned)",
        f"  loss curve            {report['loss_curve']}",
        f"  run folder            {report['run_dir']}",
    ]
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """The same report as Markdown (report.md in the run folder)."""
    base, tuned = report["base"]["accuracy"], report["tuned"]["accuracy"]
    params, train = report["parameters"], report["training"]
    lines = ["# lorakit quickstart: base vs instruction-tuned", "",
             f"Base model `{report['model']}`, {report['method']}, trained on "
             f"{report['data']['train_rows']} question/answer rows about "
             f"{report['data']['train_countries']} countries; evaluated on "
             f"{report['data']['eval_rows']} questions about {report['data']['eval_countries']} "
             "held-out countries.", "",
             "| held-out exact match | base | tuned |", "|---|---:|---:|"]
    lines += [f"| {kind} | {base.get(kind, 0):.1%} | {tuned[kind]:.1%} |" for kind in tuned]
    lines += ["", "| question | reference | base | tuned |", "|---|---|---|---|"]
    for item in report["examples"]:
        cells = [_question(item["prompt"]), item["reference"].strip(), _clip(item["base"]),
                 _clip(item["tuned"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += [
        "",
        f"- Trainable parameters: {params['trainable']:,} of {params['total']:,} "
        f"({_times(params['trainable'], params['total'])}).",
        f"- Training: {train['steps']} steps, {train['wall_time_s']:.1f} s, "
        f"{train['tokens_per_s']:,.0f} tokens/s.",
        f"- Forgetting (loss on {report['data']['general_rows']} fresh pre-training-style documents): "
        f"{report['base']['general_loss']:.3f} before, {report['tuned']['general_loss']:.3f} after.",
        f"- Loss curve: ![loss curve]({report['loss_curve_name']})",
        "",
    ]
    return "\n".join(lines)
