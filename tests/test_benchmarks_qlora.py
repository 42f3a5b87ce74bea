"""Smoke test of benchmarks/qlora_memory.py on the tiny size (it never checks memory ratios).

The script's figures must be well formed: NF4 + double quantisation stays a little above 0.5 bytes per
base weight, and merging into the dequantised base costs far less than re-quantising the merge.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora_memory.py"


@pytest.mark.timeout(180)
def test_qlora_memory_reports_bytes_per_parameter_rss_and_merge_error(tmp_path: Path) -> None:
    out = tmp_path / "qlora.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    lora, qlora = result["lora"], result["qlora"]
    assert lora["bytes_per_base_param"] == 2.0
    assert 0.5 < qlora["bytes_per_base_param"] < 0.6  # 0.516 at medium size; per-tensor code books weigh more here
    assert lora["trainable, total"] == qlora["trainable, total"]
    for run in (lora, qlora):
        assert run["peak_rss_train_mb"] > 0 and len(run["losses"]) == 2
    merge = qlora["merge"]
    assert 0 <= merge["dequantised_bf16"]["mean_kl"] < merge["requantised_nf4"]["mean_kl"]
