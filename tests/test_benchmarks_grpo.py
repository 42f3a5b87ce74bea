"""Smoke test of benchmarks/grpo_speed.py: the real script, tiny size, TRL's GRPOTrainer and lorakit, a few steps.

It checks the result's structure and what must hold whatever the speed: both sides sampled the same group size
G, --prompts x G completions at every step, every completion exactly --completion-length tokens (the shared
model cannot emit EOS: `unreachable_eos`, checked on its own below), on the very same prompts, and the rates are
the counts over the clocks. It never checks speed.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_speed.py"
STEPS, WARMUP, PROMPTS, G, LENGTH = 3, 1, 2, 4, 8


def test_grpo_speed_runs_both_sides_with_the_same_groups_and_lengths(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", str(STEPS), "--warmup", str(WARMUP), "--prompts",
         str(PROMPTS), "--generations", str(G), "--completion-length", str(LENGTH), "--threads", "1",
         "--pipelines", "trl", "lorakit", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert (settings["size"], settings["prompts_per_step"], settings["num_generations"]) == ("tiny", PROMPTS, G)
    assert (settings["completion_length"], settings["beta"], settings["loss_type"]) == (LENGTH, 0.0, "dapo")
    assert settings["goal"] == 3.0  # issue 21's goal, the default
    assert {"cpu_model", "cpu_family", "cpu_flags", "trl", "torch"} <= result["environment"].keys()
    trl, lorakit = result["runs"]
    assert (trl["pipeline"], lorakit["pipeline"]) == ("trl", "lorakit")
    measured = PROMPTS * G * (STEPS - WARMUP)
    for run in (trl, lorakit):
        assert run["steps"] == STEPS and run["measured_steps"] == STEPS - WARMUP
        assert (run["num_generations"], run["max_completion_length"], run["beta"]) == (G, LENGTH, 0.0)
        assert run["step_completions"] == [PROMPTS * G] * STEPS and run["completions"] == measured
        assert run["completion_lengths"] == [LENGTH] and run["target_tokens"] == measured * LENGTH
        assert run["completions_per_s"] == run["completions"] / run["train_seconds"]
        assert run["completions_per_cpu_s"] == run["completions"] / run["cpu_seconds"]
        assert run["sampled_tokens_per_s"] == run["target_tokens"] / run["sampling_seconds"]
        assert 0 < run["sampling_seconds"] < run["train_seconds"] and 0 < run["sampling_share"] < 1
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"])
        assert 0.0 <= run["mean_reward"] <= 1.0  # contains: 0 or 1 per completion
        assert run["peak_mb"] >= run["baseline_mb"] > 0
    assert result["sanity"] == {"same_prompts": True, "same_lengths": True, "same_completions": True,
                                "same_group": True}
    assert (trl["precision"], trl["weights"], trl["gradient_checkpointing"]) == ("bf16 autocast", "float32", True)
    assert trl["loss_type"] == "dapo"  # GRPOConfig's default, lorakit's too
    assert [line.split(" ", 1)[0] for line in lorakit["auto_choices"]] == ["compile:", "precision:"]
    assert lorakit["auto_choices"][1].startswith("precision: fp32 (auto: LORAKIT_AUTO=off")  # the suite's setting
    ratio = result["round_ratios"]["lorakit"]
    assert ratio["rounds"] == 1 and ratio["ratios"] == [lorakit["completions_per_s"] / trl["completions_per_s"]]
    assert "completions/s (wall)" in done.stdout and "completions/s over trl, round by round" in done.stdout
    assert "goal 3x" in done.stdout


def test_unreachable_eos_gives_eos_no_probability_and_keeps_the_other_tokens_distribution() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from grpo_speed import unreachable_eos
        from sft_workload import SIZES, build_model, make_tokenizer
    finally:
        sys.path.remove(str(SCRIPT.parent))
    size = SIZES["tiny"]
    tokenizer = make_tokenizer(size, 0)
    model = build_model(size, 0, tokenizer).eval()
    eos = tokenizer.eos_token_id
    ids = torch.randint(3, size.vocab, (4, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits.softmax(-1)  # (B, T, V)
        unreachable_eos(model, eos)
        after = model(ids).logits.softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            after_bf16 = model(ids).logits.float().softmax(-1)
    assert (before[..., eos] > 0).all()  # a random model can end anywhere
    assert (after[..., eos] == 0).all() and (after_bf16[..., eos] == 0).all()
    others = [t for t in range(size.vocab) if t != eos]
    # one of 64 hidden channels turned constant: the other tokens' distribution keeps its shape
    correlation = torch.corrcoef(torch.stack([before[..., others].flatten(), after[..., others].flatten()]))[0, 1]
    assert correlation > 0.9
