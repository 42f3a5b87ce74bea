"""Smoke test of benchmarks/infer_paths.py (the generation benchmark): the real script on the tiny size, both
workloads (the batch and single requests). It checks the result's shape and that every lorakit variant produced
peft's token ids; it never checks speed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "infer_paths.py"


def test_infer_paths_tiny_run_is_exact_and_well_formed(tmp_path: Path) -> None:
    out = tmp_path / "infer.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--prompts", "3", "--single", "2",
                           "--new-tokens", "4", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["not_exact"] == [] and result["threads"] == 1 and result["repeats"] == 1
    sides = {workload: [r["side"] for r in rows] for workload, rows in result["workloads"].items()}
    assert sides == {"batch": ["peft-generate", "lorakit-plain", "lorakit-unmerged", "lorakit"],
                     "single": ["peft-generate", "lorakit-plain", "lorakit"]}
    for workload, rows in result["workloads"].items():
        count = 3 if workload == "batch" else 2
        for row in rows:
            assert row["same_ids_as_peft"] == count and row["new_tokens"] == 4 * count
            assert len(row["cpu_seconds"]) == 1 and row["tokens_per_cpu_s"] > 0
    assert "single requests: 2 prompts" in done.stdout and "NOT EXACT" not in done.stdout
