"""docs/lab.md's section (h), a per-modality adapter on the frozen LM, and its figure, from lab/vision.py's results.

`lorakit lab-vision` writes the section into an existing lab.md (replacing an earlier (h), else before "## All
runs"), with the example figure and a copy of results.json beside it. Rules are printed before the numbers, from
the same `evidence.Rule`s the verdicts use.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorakit.lab.evidence import Rule, pct, verdict_word
from lorakit.lab.sections import put_section
from lorakit.lab.vision import ARMS, MEASURES, SWEEP_SEED
from lorakit.plotting import new_figure, save_figure

HEADING = "## (h) Images on a frozen LM: per-modality adapters"
FIGURE = "lab_vision_examples.png"
RESULTS_COPY = "lab_vision_results.json"
COMMAND = "lorakit lab-vision --out docs --work runs/lab"
LORA_BUYS = Rule("above", low=0.0)  # routed minus projector-only, composed questions on held-out countries
MEASURE_NAMES = {"flag": "flag question", "composed": "composed, held-out countries",
                 "composed_seen": "composed, trained countries", "text": "text questions"}


def _interval(found: dict, signed: bool = False) -> str:
    low, high = found["interval"]
    fmt = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    return f"{fmt(found['mean'])}{'' if signed else '%'} [{fmt(low)}, {fmt(high)}]"


def examples_figure(results: dict, path: Path, count: int = 12) -> Path:
    """Test renderings with the routed arm's first-seed answers to the flag question (and the reference)."""
    from PIL import Image

    shown = results["examples_flag"][:count]
    cols = 6
    rows = (len(shown) + cols - 1) // cols
    figure, _ = new_figure(width=1.6 * cols, height=1.9 * rows)
    figure.clear()
    for index, (image, answer, reference) in enumerate(shown):
        axes = figure.add_subplot(rows, cols, index + 1)
        axes.imshow(np.asarray(Image.open(Path(results["data_dir"]) / image).convert("RGB")), interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        ok = answer.strip().lower() == reference.strip().lower()
        axes.set_title(f"{answer.strip()[:16]}" + ("" if ok else f"\n(is {reference.strip()[:14]})"), fontsize=8,
                       color="black" if ok else "firebrick")
    return save_figure(figure, path)


def vision_section(results: dict) -> str:
    """Section (h): setup, the rules, then the numbers and the verdicts."""
    s, lm, acc, diff = results["settings"], results["lm"], results["accuracy"], results["differences"]
    held = ", ".join(results["countries"]["composed_held_out"])
    lines = [
        HEADING, "",
        "Claim (the Phi-4-multimodal pattern): a new input type gets its own encoder, projector and LoRA, switched "
        "on only for inputs of that type, so adding it never retrains the language model and never changes its text "
        "behaviour; the modality's own LoRA lets the model use the new input beyond what soft tokens alone reach.", "",
        f"Run with `{COMMAND}` (resumable; every number below is in [{RESULTS_COPY}]({RESULTS_COPY})). The language "
        f"model: the embedded model fully fine-tuned on the quickstart's questions ({lm['steps']} steps at lr "
        f"{lm['lr']:.0e}; {pct(lm['text_accuracy'])} on the {results['rows']['text']} held-out text "
        "questions), then frozen. Images: procedural flags of "
        f"{len(results['countries']['flags'])} countries (`lorakit/lab/flags.py`: stripes, Nordic crosses, discs, "
        f"a plus), {s['image_size']}x{s['image_size']} px, each rendering at a random size, position, colour jitter "
        f"and noise; {s['train_renderings']} training renderings per country, {s['eval_renderings']} validation and "
        f"{s['eval_renderings']} test renderings per country, never shared. Training rows: \"Which country's flag is "
        "this?\" for every country, and the composed questions (\"What is the capital of the country whose flag "
        "this is?\", \"On which continent is ...?\") for "
        f"{len(results['countries']['composed_train'])} countries; never composed in training: {held}. Each arm: "
        f"an image encoder ({s['patch_size']}px patches, 2 layers) and a projector to {s['num_tokens']} soft tokens, "
        f"trained from scratch for {s['steps']} steps (micro-batch {s['micro_batch']}):", "",
        f"- **routed**: plus a rank-{s['r']} LoRA on every linear layer of the LM, active only for rows with an image "
        "(`method: modality`);",
        "- **projector-only**: no LoRA (`r: 0`), the LM sees the soft tokens and nothing else changes;",
        f"- **shared**: the same rank-{s['r']} LoRA on every row, text rows included (`lora_rows: all`), as a "
        "non-routed adapter would be.", "",
        "Each arm's lr comes from a search on the 2x lattice (coarse points, extended while the best sits at an edge, "
        f"then refined) at seed {SWEEP_SEED}, scored on the *validation* renderings (the flag question, and the "
        "composed questions of the trained countries only: the held-out countries never choose an lr). Reported: "
        f"seeds {', '.join(map(str, s['seeds']))} at that lr, on the *test* renderings.", "",
        "**Rules, fixed before the runs.**",
        "- Text unchanged: the routed arm's greedy answers to every held-out text question equal the frozen LM's, "
        "in every seed (and `tests/test_adapters_modality.py` asserts bitwise-equal logits for text rows in a mixed "
        "batch).",
        "- What the per-modality LoRA buys: " + LORA_BUYS.describe(
            "routed minus projector-only accuracy on the composed questions of held-out countries (questions and "
            "seeds resampled)", lambda v: f"{100 * v:+.0f} points"), "",
        "| arm | lr points (validation accuracy) | chosen lr |", "|---|---|---:|"]
    for arm, found in results["searches"].items():
        points = ", ".join(f"{lr}: {pct(v)}" for lr, v in found["points"].items())
        note = " (at a grid edge)" if found["at_edge"] else ""
        note += " (search capped)" if found["capped"] and found["at_edge"] else ""
        lines.append(f"| {arm} | {points} | {found['lr']:.3g}{note} |")
    lines += ["", f"![test renderings and the routed arm's answers]({FIGURE})", "",
              "| arm | trainable params | " + " | ".join(MEASURE_NAMES[m] for m in MEASURES) + " |",
              "|---|---:|" + "---:|" * len(MEASURES),
              f"| frozen LM (no images) | | | | | {pct(results['start_text'])} |"]
    for arm in ARMS:
        params = results["arms"][arm]["runs"][0]["trainable_params"]
        lines.append(f"| {arm} | {params:,} | " + " | ".join(_interval(acc[arm][m]) for m in MEASURES) + " |")
    lines += ["", "Mean over seeds [95% bootstrap interval]; exact match of the greedy answer.", "",
              "The composed questions by kind (held-out countries | trained countries):", "",
              "| arm | capital | continent | capital, trained | continent, trained |", "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        kinds = results["by_kind"][arm]
        lines.append(f"| {arm} | " + " | ".join(_interval(kinds[f"{m}/{k}"]) for m in ("composed", "composed_seen")
                                                 for k in ("capital", "continent")) + " |")
    continent, continent_share = results["majority_continent"]
    lines += ["", f"Always answering \"{continent}\" would score {pct(continent_share)} on the held-out continent questions; "
              f"chance on the flag question is {pct(1 / len(results['countries']['flags']))}.", ""]
    equal = results["routed_text_equal"]
    lines.append(("**Text unchanged: yes.** " if equal else "**Text unchanged: NO.** ")
                 + "The routed arm's text answers " + ("equal" if equal else "differ from")
                 + f" the frozen LM's in every seed; the shared LoRA moves text accuracy by "
                 f"{_interval(diff['shared_text_minus_start'], signed=True)} points.")
    kinds = results["by_kind"]["routed"]
    lines += ["", "Does the model combine what it sees with what it knew? The routed arm's capital answers for "
              f"countries whose flags it learned to name but never saw in a composed question: "
              f"{_interval(kinds['composed/capital'])}, against {_interval(kinds['composed_seen/capital'])} for "
              f"countries it was trained on, with {_interval(acc['routed']['flag'])} of flags named; its held-out "
              f"continent answers, {_interval(kinds['composed/continent'])}, are to be read against the "
              f"{pct(continent_share)} of always answering \"{continent}\"."]
    buys = LORA_BUYS.verdict(tuple(diff["routed_minus_projector_composed"]["interval"]))
    lines += ["", f"{verdict_word(buys)} Routed minus projector-only on held-out composed questions: "
              f"{_interval(diff['routed_minus_projector_composed'], signed=True)} points; on the flag question "
              f"{_interval(diff['routed_minus_projector_flag'], signed=True)}; routed minus shared on held-out "
              f"composed questions {_interval(diff['routed_minus_shared_composed'], signed=True)}."]
    return "\n".join(lines) + "\n"


def write_vision_section(lab_md: Path, results: dict) -> Path:
    """Put section (h) into `lab_md` (`put_section`), its figure and the results copy beside it."""
    lab_md.parent.mkdir(parents=True, exist_ok=True)
    examples_figure(results, lab_md.parent / FIGURE)
    (lab_md.parent / RESULTS_COPY).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return put_section(lab_md, HEADING, vision_section(results))
