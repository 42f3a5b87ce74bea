"""Smoke test of benchmarks/serve_speed.py: the real script in its quick mode (a tiny model, a few requests),
both real servers (`lorakit serve` and `transformers serve --continuous-batching`) started as subprocesses on
127.0.0.1, and lorakit serving adapters by request `model`. It checks the JSON result is well formed and that
every request got a non-empty completion of the length asked for; it never checks speed."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_speed.py"
REQUESTS, LEVELS = 8, ("1", "4")
pytestmark = pytest.mark.timeout(400)


def test_serve_speed_quick_writes_a_well_formed_result(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--requests", str(REQUESTS), "--concurrency", ",".join(LEVELS),
         "--adapters", "2", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())

    settings = result["settings"]
    assert settings["requests"] == REQUESTS and settings["concurrency"] == [1, 4] and settings["threads"] == 1
    assert settings["dtype"] == "bfloat16" and settings["transformers_mode"] == "cb"
    assert len(settings["workload"]["requests"]) == REQUESTS
    assert {"cpu_model", "cpu_flags", "torch", "transformers", "lorakit"} <= set(result["environment"])
    assert set(result["servers"]) == {"lorakit", "transformers"}
    assert "--continuous-batching" in result["servers"]["transformers"]["command"]
    measured = [*result["servers"].values(), result["adapters"]["lorakit"]]
    for entry in measured:
        assert list(entry["levels"]) == list(LEVELS) and entry["startup_s"] > 0
        for level in entry["levels"].values():
            assert level["requests"] == level["ok"] == REQUESTS and level["errors"] == []
            assert level["all_nonempty"] and level["all_full_length"]
            assert level["tokens_per_s"] > 0 and level["requests_per_s"] > 0 and level["latency_p95_s"] > 0
            assert level["streams"] == settings["workload"]["stream"] and level["ttft_p50_s"] > 0
            for outcome in level["outcomes"]:  # every request: a non-empty completion of max_tokens tokens
                wanted = settings["workload"]["requests"][outcome["index"]]["max_tokens"]
                assert outcome["status"] == 200 and outcome["text"] and outcome["completion_tokens"] == wanted
    assert all(result["checks"].values()), result["checks"]
    for level in LEVELS:
        assert all(math.isfinite(r) and r > 0 for r in result["ratios"][level].values() if r is not None)
    adapters = result["adapters"]
    assert adapters["names"] == ["a0", "a1"] and adapters["models_in_turn"] == ["base", "a0", "a1"]
    used = {o["model"] for o in adapters["lorakit"]["levels"]["4"]["outcomes"]}
    assert used == {"base", "a0", "a1"}  # rows of one run went to the base and to each adapter
    assert adapters["transformers_probe"]["status"] >= 400  # a pinned transformers server refuses an adapter name
    assert result["agreement"]["requests"] == REQUESTS
    assert result["agreement"]["same_prompt_tokens"] == REQUESTS  # both servers saw the same prompts
    assert "lorakit / transformers serve" in done.stdout and "tok/s" in done.stdout
