"""Smoke test of benchmarks/dropout_mask.py on a small input (it never checks speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dropout_mask.py"


@pytest.mark.timeout(180)
def test_dropout_mask_times_every_variant_eager_and_compiled(tmp_path: Path) -> None:
    out = tmp_path / "dropout.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "64", "--features", "32", "--rank", "4",
                           "--rounds", "2", "--calls", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    names = ["no dropout", "nn.Dropout", "lorakit"]
    assert list(result["cpu_ms"]) == names + [f"{n}, compiled" for n in names]
    assert all(ms > 0 for ms in result["cpu_ms"].values())
    assert all(len(rounds) == 2 for rounds in result["rounds_ms"].values())
    assert "nn.Dropout / lorakit, eager:" in done.stdout and "nn.Dropout / lorakit, compiled:" in done.stdout
