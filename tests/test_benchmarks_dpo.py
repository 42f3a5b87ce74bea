"""Smoke test of benchmarks/dpo_speed.py: the real script, tiny size, TRL's DPOTrainer and lorakit, a few steps.

It checks the result's structure and what must hold whatever the speed: both sides trained the very same pairs
(ids and trained positions), each step took --pairs pairs, both started at DPO's log 2 (a fresh adapter is its own
reference on both sides), and the JSON records the settings each side ran with. It never checks speed.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from _tol import approx

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo_speed.py"
STEPS, WARMUP, PAIRS = 3, 1, 4


def test_dpo_speed_runs_both_sides_on_the_same_pairs_and_reports_them(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", str(STEPS), "--warmup", str(WARMUP), "--pairs",
         str(PAIRS), "--rows", "24", "--threads", "1", "--pipelines", "trl", "lorakit", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["size"] == "tiny" and result["settings"]["pairs_per_step"] == PAIRS
    assert (result["settings"]["beta"], result["settings"]["loss"]) == (0.1, "sigmoid")
    assert {"cpu_model", "cpu_family", "cpu_flags", "trl", "torch"} <= result["environment"].keys()
    trl, lorakit = result["runs"]
    assert (trl["pipeline"], lorakit["pipeline"]) == ("trl", "lorakit")
    for run in (trl, lorakit):
        assert run["steps"] == STEPS and run["measured_steps"] == STEPS - WARMUP
        assert run["step_pairs"] == [PAIRS] * STEPS and run["pairs"] == PAIRS * (STEPS - WARMUP)
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"])
        assert run["first_loss"] == approx(math.log(2))  # policy = reference: a margin of 0, loss log 2 in fp32
        assert run["pairs_per_s"] == run["pairs"] / run["train_seconds"] and run["target_tokens"] > 0
        assert run["peak_mb"] >= run["baseline_mb"] > 0
    assert result["sanity"]["same_pairs"] is True
    assert (trl["precision"], trl["gradient_checkpointing"]) == ("bf16 autocast", True)  # DPOConfig's defaults
    assert lorakit["auto_choices"] == [  # the suite runs with LORAKIT_AUTO=off: every auto setting says so
        "pair layout: padded pairs (auto: LORAKIT_AUTO=off; data.packing=true for the shared-prompt layout)",
        "precision: fp32 (auto: LORAKIT_AUTO=off; train.precision=bf16 for bf16)",
        "compile: off (auto: LORAKIT_AUTO=off; train.compile=true to compile)"]
    ratio = result["round_ratios"]["lorakit"]
    assert ratio["rounds"] == 1 and ratio["ratios"] == [lorakit["pairs_per_s"] / trl["pairs_per_s"]]
    assert "pairs/s (wall)" in done.stdout and "pairs/s over trl, round by round" in done.stdout
