"""Smoke test of benchmarks/bench_sft.py: the real script, tiny size, a few steps, one repeat.

It checks the JSON result is well formed and internally consistent (both pipelines trained the
same examples for the same number of steps; packing removed padding). It never checks speed.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sft.py"
STEPS, WARMUP = 3, 1


def test_bench_sft_writes_a_well_formed_result(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", str(STEPS), "--warmup", str(WARMUP),
         "--repeats", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["settings"]["size"] == "tiny" and result["settings"]["device"] == "cpu"
    assert result["settings"]["precision"] == "fp32"
    assert [(r["repeat"], r["pipeline"]) for r in result["runs"]] == [(0, "trainer"), (0, "lorakit")]
    for run in result["runs"]:
        assert run["steps"] == STEPS and run["measured_steps"] == STEPS - WARMUP
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"])
        assert run["target_tokens"] > 0 and run["train_seconds"] > 0
        assert run["peak_mb"] >= run["baseline_mb"] > 0
    assert result["sanity"]["same_examples"] is True
    trainer, lorakit = result["summary"]["trainer"], result["summary"]["lorakit"]
    assert lorakit["padding_fraction"] < trainer["padding_fraction"]  # packing, against dynamic padding
    for key, ratio in result["ratios"].items():
        assert math.isfinite(ratio) and ratio > 0, key
    assert math.isclose(result["ratios"]["tokens_per_s"], lorakit["tokens_per_s"] / trainer["tokens_per_s"])
    assert "lorakit/trainer" in done.stdout and "target tokens/s" in done.stdout
