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
    if "dpo" in report:
        lines += dpo_lines(report["dpo"])
    return "\n".join(lines)


SHOWN_CHANGES = 6  # changed answers the terminal shows (report.md and report.json hold them all)


def _dpo_rows(dpo: dict) -> list[tuple[str, str, str]]:
    """(measure, SFT, SFT + DPO) rows of the DPO comparison, formatted."""
    sft, tuned = dpo["sft"], dpo["dpo"]
    rows = [("held-out exact match", f"{sft['accuracy']['all']:.1%}", f"{tuned['accuracy']['all']:.1%}")]
    rows += [(f"  {kind}", f"{sft['accuracy'].get(kind, 0):.1%}", f"{value:.1%}")
             for kind, value in tuned["accuracy"].items() if kind != "all"]
    rows.append(("mean margin (nats)", f"{sft['margin']:.2f}", f"{tuned['margin']:.2f}"))
    rows += [(f"  vs {kind.replace('_', ' ')}", f"{sft['margin_by_rejected'].get(kind, 0):.2f}", f"{value:.2f}")
             for kind, value in tuned["margin_by_rejected"].items()]
    rows.append(("chosen likelier", f"{sft['chosen_likelier']:.1%}", f"{tuned['chosen_likelier']:.1%}"))
    rows.append(("general-text loss", f"{sft['general_loss']:.3f}", f"{tuned['general_loss']:.3f}"))
    return rows


def dpo_lines(dpo: dict) -> list[str]:
    """The SFT vs SFT + DPO comparison as terminal lines."""
    lines = ["", f"SFT then DPO (beta {dpo['beta']}), on {dpo['pairs']['eval']} held-out preference pairs "
                 "(rejected: a plausible wrong answer, or the right one in a sentence):", "",
             f"  {'':<26}{'SFT':>8}{'+ DPO':>8}"]
    lines += [f"  {name:<26}{before:>8}{after:>8}" for name, before, after in _dpo_rows(dpo)]
    shown = dpo["changed"][:SHOWN_CHANGES]
    if shown:
        lines += ["", f"  answers DPO changed: {len(dpo['changed'])} of {dpo['pairs']['eval']}"
                      + (f" ({len(shown)} shown)" if len(shown) < len(dpo["changed"]) else "")]
    for item in shown:
        lines.append(f"  Q: {_question(item['prompt'])}   (reference: {item['reference'].strip()})")
        lines.append(f"     SFT : {_clip(item['sft'])!r}")
        lines.append(f"     +DPO: {_clip(item['dpo'])!r}")
    train = dpo["training"]
    lines += ["", "  margin: log p(chosen) - log p(rejected), each answer's token log-probs summed",
              f"  forgetting            general-text loss {dpo['base_general_loss']:.3f} (base) -> "
              f"{dpo['sft']['general_loss']:.3f} (SFT) -> {dpo['dpo']['general_loss']:.3f} (SFT + DPO)",
              f"  DPO training          {train['steps']} steps in {train['wall_time_s']:.1f} s",
              f"  DPO run folder        {dpo['run_dir']}"]
    return lines


def dpo_markdown(report: dict) -> str:
    """The SFT vs SFT + DPO comparison as Markdown (report.md, with `lorakit quickstart --dpo`)."""
    dpo = report["dpo"]
    lines = ["## SFT then DPO", "",
             f"DPO (beta {dpo['beta']}) from the SFT adapter on preference pairs about the training countries; "
             f"scored on {dpo['pairs']['eval']} held-out pairs (rejected: a plausible wrong answer, or the right one "
             "in a sentence). Margin: log p(chosen) - log p(rejected), each answer's token log-probs summed.", "",
             "| held-out | SFT | SFT + DPO |", "|---|---:|---:|"]
    lines += [f"| {name.strip()} | {before} | {after} |" for name, before, after in _dpo_rows(dpo)]
    if dpo["changed"]:
        lines += ["", f"Answers DPO changed: {len(dpo['changed'])} of {dpo['pairs']['eval']}.", "",
                  "| question | reference | SFT | SFT + DPO |", "|---|---|---|---|"]
        for item in dpo["changed"]:
            cells = [_question(item["prompt"]), item["reference"].strip(), _clip(item["sft"]), _clip(item["dpo"])]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", f"- Forgetting (general-text loss): {dpo['base_general_loss']:.3f} base, "
                  f"{dpo['sft']['general_loss']:.3f} after SFT, {dpo['dpo']['general_loss']:.3f} after DPO.",
              f"- DPO training: {dpo['training']['steps']} steps, {dpo['training']['wall_time_s']:.1f} s; run folder "
              f"`{dpo['run_dir']}`.", ""]
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
