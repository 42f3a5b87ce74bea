"""The lecture's numbers, computed by the calculator itself, with their assumptions.

Every case names its method config with the values the lecture uses (`LoRA(r=16)`, `Full()`), and
is counted the way `lorakit calc` counts: the method applied to the preset's meta skeleton.

- Exercise 1: one 10,000 x 10,000 layer with LoRA r = 8 trains 8 * (10,000 + 10,000) = 160,000
  numbers instead of 100,000,000: 625x fewer.
- Exercise 2: LoRA r = 8 on q_proj and v_proj of a 7B Llama: 32 layers * 2 * 8 * (4096 + 4096)
  = 4,194,304 trainable parameters, 0.06% of 6.74 B.
- The 7B claim, full fine-tuning "up to 50 GB" and PEFT "about 20 GB": which training setups
  land there (see `seven_b_scenarios`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.adapters import Full, LoRA, QLoRA
from lorakit.adapters.lora_math import lora_param_count
from lorakit.analysis.memory import GB, MemoryEstimate, TrainingSetup, estimate
from lorakit.analysis.params import method_count
from lorakit.analysis.presets import preset_config
from lorakit.analysis.shapes import shape_from_config


@dataclass(frozen=True)
class Scenario:
    """One way to train the 7B model, and the lecture figure it is checked against."""

    label: str
    method: Any  # a method config
    setup: TrainingSetup
    claim_gb: float  # 50 for full fine-tuning, 20 for PEFT


# batch 1 x 2048 tokens, bf16 activations unless said otherwise
SEVEN_B_SCENARIOS = (
    Scenario("full, mixed precision: bf16 weights+grads, fp32 AdamW m+v and fp32 master weights, checkpointing",
             Full(), TrainingSetup(master_weights=True, gradient_checkpointing=True), 50),
    Scenario("full, pure bf16: bf16 weights+grads, fp32 AdamW m+v, checkpointing",
             Full(), TrainingSetup(gradient_checkpointing=True), 50),
    Scenario("full, bf16 weights+grads, 8-bit AdamW, checkpointing",
             Full(), TrainingSetup(optimizer="adamw-8bit", gradient_checkpointing=True), 50),
    Scenario("full, bf16 weights+grads, no optimizer state (plain SGD), checkpointing",
             Full(), TrainingSetup(optimizer="sgd", gradient_checkpointing=True), 50),
    Scenario("LoRA r16 all-linear, bf16 base, fp32 adapters + AdamW, no checkpointing",
             LoRA(r=16), TrainingSetup(), 20),
    Scenario("LoRA r16 all-linear, bf16 base, 1 x 1024 tokens, no checkpointing",
             LoRA(r=16), TrainingSetup(seq_len=1024), 20),
    Scenario("LoRA r16 all-linear, bf16 base, checkpointing",
             LoRA(r=16), TrainingSetup(gradient_checkpointing=True), 20),
    Scenario("QLoRA r16 all-linear, NF4 base, checkpointing",
             QLoRA(r=16), TrainingSetup(gradient_checkpointing=True), 20),
)


def lora_matrix_count(d_in: int, d_out: int, r: int) -> tuple[int, int]:
    """(full matrix entries, LoRA entries) for one d_in x d_out layer: the lecture's Exercise 1."""
    return d_in * d_out, lora_param_count(d_in, d_out, r)


def exercise_1(d: int = 10_000, r: int = 8) -> tuple[int, int, float]:
    """(full entries, LoRA entries, ratio) for one d x d layer."""
    full, lora = lora_matrix_count(d, d, r)
    return full, lora, full / lora


def exercise_2(preset: str = "7B", r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")
               ) -> tuple[int, int]:
    """(LoRA trainable parameters, total parameters) for `targets` of a preset model."""
    count = method_count(preset, LoRA(r=r, targets=list(targets)))
    return count.trainable, count.total


def seven_b_scenarios() -> list[tuple[Scenario, MemoryEstimate]]:
    """Every scenario with its estimate on the generic 7B (Llama-2-7B shape)."""
    shape = shape_from_config(preset_config("7B"))
    counts = {repr(s.method): method_count("7B", s.method) for s in SEVEN_B_SCENARIOS}  # one per distinct config
    return [(s, estimate(shape, counts[repr(s.method)], s.setup)) for s in SEVEN_B_SCENARIOS]


def lecture_text() -> str:
    """The lecture's numbers as printed by `lorakit calc --lecture`."""
    full, lora, ratio = exercise_1()
    count, total = exercise_2()
    lines = ["Exercise 1: a 10,000 x 10,000 layer, LoRA r=8",
             f"  full: {full:,} numbers; LoRA: 8 x (10,000 + 10,000) = {lora:,}; {ratio:,.0f}x fewer", "",
             "Exercise 2: LoRA r=8 on q_proj, v_proj of a 7B Llama (Llama-2-7B shape)",
             f"  32 layers x 2 x 8 x (4096 + 4096) = {count:,} of {total:,} ({100 * count / total:.3f}%)", "",
             "The 7B claim: full fine-tuning 'up to 50 GB', PEFT 'about 20 GB' (batch 1 x 2048 tokens, bf16 "
             "activations unless said otherwise)",
             f"  {'setup':<104}{'weights':>8}{'grads':>7}{'optim':>7}{'activ':>7}{'total':>7}  vs claim"]
    for scenario, est in seven_b_scenarios():
        verdict = "within" if est.total / GB <= scenario.claim_gb * 1.1 else "above"
        lines.append(f"  {scenario.label:<104}{est.weights / GB:>8.1f}{est.gradients / GB:>7.1f}"
                     f"{est.optimizer / GB:>7.1f}{est.activations / GB:>7.1f}{est.total / GB:>7.1f}  "
                     f"{verdict} {scenario.claim_gb:.0f} GB")
    lines += ["",
              "  So 'up to 50 GB' for full fine-tuning needs 16-bit weights and gradients and an 8-bit (or no)",
              "  optimizer state; standard mixed-precision AdamW needs 16 bytes per parameter, over 100 GB.",
              "  'About 20 GB' for LoRA is the bf16 base (13.5 GB) plus activations of ~1k-2k tokens;",
              "  QLoRA brings it under 10 GB."]
    return "\n".join(lines)
