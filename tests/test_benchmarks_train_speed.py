"""Smoke test of benchmarks/train_speed.py's user pipeline (`lorakit-default`): the real script, tiny size.

`lorakit-default` trains through `lorakit.finetune` from the config a user writes (no speed settings) on a
dataset longer than the timed steps; the step clock stops it after --steps steps. The test checks it stops
there, counts real tokens per step, reports the auto lines and its time to first step. It never checks speed.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"
STEPS, WARMUP = 3, 1


def test_the_user_pipeline_stops_after_the_timed_steps_of_a_longer_run(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", str(STEPS), "--warmup", str(WARMUP),
         "--pipelines", "trainer", "lorakit-default", "--no-inference", "--threads", "1", "--user-rows", "80",
         "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    trainer, user = result["runs"]
    assert user["pipeline"] == "lorakit-default" and user["user_rows"] == 80
    assert user["steps"] == STEPS and len(user["losses"]) == STEPS and all(math.isfinite(x) for x in user["losses"])
    assert len(user["step_real_tokens"]) == STEPS and all(n > 0 for n in user["step_real_tokens"])
    assert 0 <= user["padding_fraction"] < 1 and user["seconds_to_first_step"] > 0
    # the suite runs with LORAKIT_AUTO=off: every auto setting says so
    assert [line.split(":")[0] for line in user["auto_choices"]] == ["packing", "precision", "compile"]
    assert all("LORAKIT_AUTO=off" in line for line in user["auto_choices"])
    assert user["time_to_first_step_line"].startswith("time to first step: ")
    assert result["sanity"]["same_examples"] is True  # the user's run has its own dataset: not compared
    assert "lorakit-default" in done.stdout and "real tokens/s (wall)" in done.stdout


def test_round_ratios_count_the_rounds_that_reach_the_goal() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from train_speed import round_ratios, round_table
    finally:
        sys.path.remove(str(SCRIPT.parent))
    rounds = [[{"pipeline": "trainer", "real_tokens_per_s": 100.0}, {"pipeline": "lorakit", "real_tokens_per_s": r}]
              for r in (450.0, 390.0, 410.0)]
    found = round_ratios(rounds, goal=4.0)["lorakit"]
    assert found["ratios"] == [4.5, 3.9, 4.1] and found["min"] == 3.9 and found["median"] == 4.1
    assert (found["rounds_met"], found["rounds"]) == (2, 3)
    assert "4.50x 3.90x 4.10x   min 3.90x, 2 of 3 rounds >= 4x" in round_table({"lorakit": found}, 4.0)


def test_step_account_sorts_the_profiled_step_into_families(tmp_path: Path) -> None:
    out = tmp_path / "account.json"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "step_account.py"), "--size", "tiny", "--steps", "3",
                           "--warmup", "1", "--no-compile", "--out", str(out)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    families = result["families"]
    assert {"base matmuls", "LoRA products", "head + loss", "attention"} <= set(families)
    assert math.isclose(sum(f["share"] for f in families.values()), 1.0, rel_tol=1e-9)
    assert families["LoRA products"]["flops"] > 0 and families["base matmuls"]["flops"] > 0
    assert 0 < result["matmul_roofline_share"] < 1 and result["real_tokens"] > 0
    assert "every matmul at the peak and nothing else" in done.stdout
