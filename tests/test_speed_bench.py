"""Smoke test of benchmarks/train_speed.py: the real script on the tiny size, four pipelines + generation.

It checks the result is well formed and consistent (same examples and steps everywhere, the
packed pipelines carry almost no padding, rates are positive). It never checks speed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"


@pytest.mark.timeout(240)
def test_train_speed_prints_and_writes_the_three_pipelines(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1",
         "--pipelines", "trainer", "trl", "lorakit", "lorakit-ddp2", "--no-compile", "--prompts", "4", "--new-tokens", "8",
         "--multi-repeats", "1", "--generate-repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["pipeline"] for r in result["runs"]] == ["trainer", "trl", "lorakit", "lorakit-ddp2"]
    assert result["sanity"]["same_examples"]
    roofline = result["roofline"]
    assert len(roofline["samples"]) == 2  # measured before and after the runs; the best one counts
    assert roofline["flops_per_cpu_s"] == max(s["flops_per_cpu_s"] for s in roofline["samples"]) > 0
    assert roofline["flops_per_cpu_s"] >= roofline["median_flops_per_cpu_s"]
    for run in result["runs"]:
        assert run["steps"] == 2 and len(run["step_real_tokens"]) == 2 and len(run["losses"]) == 2
        assert run["real_tokens_per_cpu_s"] > 0 and 0 < run["roofline_fraction"]
        assert run["peak_mb"] > 0
    trainer, trl, lorakit, ddp = result["runs"]
    assert trainer["padding_fraction"] > 0.1  # one example per row, padded to the longest
    assert lorakit["padding_fraction"] < 0.1 and lorakit["precision"] == "bf16" and lorakit["chunked_loss"]
    # two DDP ranks: the same examples per step as one process, so the same losses; the job's
    # memory and CPU time are both ranks' added
    assert ddp["ranks"] == 2 and ddp["threads"] == 1 and len(ddp["rank_peak_mb"]) == 2
    assert ddp["peak_mb"] == pytest.approx(sum(ddp["rank_peak_mb"]))
    assert ddp["cpu_seconds"] == pytest.approx(sum(ddp["rank_cpu_seconds"]))
    assert ddp["step_real_tokens"] == lorakit["step_real_tokens"]
    assert ddp["losses"] == pytest.approx(lorakit["losses"], abs=1e-4)
    assert "real tokens/s (wall)" in done.stdout and "bf16 matmul peak" in done.stdout
    generation = result["inference"]
    assert [r["side"] for r in generation["runs"]] == ["peft-generate", "lorakit-plain", "lorakit-unmerged", "lorakit"]
    assert generation["not_exact"] == []
    for run in generation["runs"]:
        assert run["new_tokens"] == 4 * 8 and run["tokens_per_cpu_s"] > 0  # no early stop: equal work
        assert run["same_ids_as_peft"] == 4  # greedy fp32: the same tokens as transformers + peft
    multi = generation["multi_adapter"]
    assert multi["same_text"] == "32/32" and multi["speedup_vs_peft_set_adapter_loop"] > 0
    assert "new tokens/CPU-s" in done.stdout and "multi-adapter batch" in done.stdout
