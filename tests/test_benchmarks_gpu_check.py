"""benchmarks/gpu_check.sh on the CPU: the dry run's plan, its checks in tiny form, and the results file.

The speed step's tiny run is bench_sft.py's smoke test (tests/test_benchmarks_sft.py); here it is
skipped to stay fast, and its judging is tested on a made-up result.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "results.json"
    done = run("--dry-run", "--skip", "speed", "--out", str(out))
    return done, json.loads(out.read_text()) if out.is_file() else None


@pytest.mark.timeout(180)
def test_the_dry_run_prints_its_plan_and_passes_every_check_in_cpu_form(dry_run):
    done, results = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check.sh: dry-run on cpu, budget 450 s" in done.stdout
    plan = {step["step"]: step for step in results["plan"]}
    assert list(plan) == ["env,bf16,varlen,nf4", "ddp", "speed"]
    assert "torch.distributed.run --standalone --nproc-per-node 1" in plan["ddp"]["command"]
    assert "bench_sft.py --device cpu --size tiny" in plan["speed"]["command"]
    statuses = {name: result["status"] for name, result in results["results"].items()}
    assert statuses == {"env": "pass", "bf16": "pass", "varlen": "pass", "nf4": "pass", "ddp": "pass",
                        "speed": "skip"}
    assert results["mode"] == "dry-run" and results["results"]["speed"]["reason"] == "--skip speed"
    assert "| ddp | pass |" in done.stdout and "| speed | skip |" in done.stdout


def test_each_check_stays_within_its_bound_and_says_which_path_ran(dry_run):
    results = dry_run[1]["results"]
    for name in ("bf16", "varlen", "nf4", "ddp"):
        gap = results[name].get("loss_gap", results[name].get("logits_gap", results[name].get("max_weight_gap")))
        assert 0 <= gap <= results[name]["bound"], name
    assert results["bf16"]["grad_gap"] <= results["bf16"]["bound"]
    for name in ("bf16", "nf4"):  # lorakit.train in bf16: the loss fell over the short run
        losses = results[name]["train_losses"]
        assert len(losses) == gpu_check.STEPS and losses[-1] < 0.9 * losses[0]
    assert results["varlen"]["kernel"] == "per-example SDPA (CPU)" and results["varlen"]["attention_calls"] > 0
    assert results["ddp"]["backend"] == "gloo" and results["ddp"]["world_size"] == 1
    assert 0.5 < results["nf4"]["bytes_per_weight"] < 0.6
    assert results["env"]["packages"]["torch"] == version("torch")
    assert results["env"]["unmet"] == [] and results["env"]["cuda_available"] is False


def test_steps_past_the_budget_are_skipped_with_the_reason_and_the_file_is_still_written(tmp_path):
    out = tmp_path / "r.json"
    done = run("--dry-run", "--budget", "20", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"env", "bf16", "varlen", "nf4", "ddp", "speed"}
    reasons = [re.fullmatch(r"not started: (-?\d+) s of the 20 s budget left", r["reason"]) for r in results.values()]
    assert all(reasons) and all(int(m.group(1)) <= 5 for m in reasons)  # 20 s - 15 s reserve - the seconds gone


def test_bad_arguments_and_a_machine_without_cuda_exit_2_with_a_message():
    done = run("--bogus")
    assert done.returncode == 2 and "unknown argument '--bogus'" in done.stderr
    assert "Exit status:" in run("--help").stdout
    if not torch.cuda.is_available():
        done = run("--out", "/nonexistent/never-written.json")
        assert done.returncode == 2 and "torch sees no CUDA device here; on a CPU machine use --dry-run" in done.stderr


def _work(tmp_path: Path, steps: list[str]) -> Path:
    (tmp_path / "plan.tsv").write_text("bf16\t240\tpython benchmarks/gpu_check.py check bf16\n")
    (tmp_path / "steps.tsv").write_text("".join(line + "\n" for line in steps))
    return tmp_path


def test_the_report_names_a_check_that_never_wrote_its_result_and_judges_the_speed_run(tmp_path, capsys):
    work = _work(tmp_path, ["env,bf16\t124\t240\t", "speed\t0\t95\t"])
    (work / "env.json").write_text(json.dumps({"status": "pass", "packages": {"torch": "2.11.0"}, "seconds": 3}))
    (work / "env.log").write_text("loading...\nstep 3 of 12\n")
    bench = {"ratios": {"tokens_per_s": 2.5}, "sanity": {"same_examples": False, "loss_falls": {"lorakit": True}}}
    (work / "speed.json").write_text(json.dumps(bench))
    assert gpu_check.report(work, tmp_path / "out.json", "gpu") == 1
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert results["env"]["status"] == "pass"
    assert results["bf16"] == {"status": "fail", "step_seconds": 240.0, "log_tail": ["loading...", "step 3 of 12"],
                               "reason": "no result: the process ended (timed out after 240 s) before this check "
                                         "finished"}
    assert results["speed"]["status"] == "fail" and results["speed"]["reason"] == "sanity: same_examples false"
    assert results["speed"]["benchmark"] == bench
    assert "| bf16 | fail | 240.0 | no result" in capsys.readouterr().out


@pytest.mark.parametrize("falls, status, reason", [
    ({"trainer": True, "lorakit": True}, "pass", None),
    ({"trainer": False, "lorakit": True}, "fail", "sanity: loss_falls[trainer] false"),
    ({}, "fail", "sanity: loss_falls[(no pipeline)] false")])
def test_the_speed_run_passes_only_when_both_losses_fell(tmp_path, falls, status, reason):
    work = _work(tmp_path, ["speed\t0\t95\t"])
    (work / "speed.json").write_text(json.dumps({"ratios": {"tokens_per_s": 2.5},
                                                 "sanity": {"same_examples": True, "loss_falls": falls}}))
    assert gpu_check.report(work, tmp_path / "out.json", "gpu") == (status == "fail")
    speed = json.loads((tmp_path / "out.json").read_text())["results"]["speed"]
    assert (speed["status"], speed.get("reason"), speed["ratios_lorakit_over_trainer"]) == \
        (status, reason, {"tokens_per_s": 2.5})


def test_a_failed_benchmark_run_is_a_failure_with_its_log(tmp_path):
    work = _work(tmp_path, ["speed\t1\t12\t"])
    (work / "speed.log").write_text("Traceback ...\nImportError: no module named peft\n")
    assert gpu_check.report(work, tmp_path / "out.json", "gpu") == 1
    speed = json.loads((tmp_path / "out.json").read_text())["results"]["speed"]
    assert speed["reason"] == "bench_sft.py ended with exit code 1" and speed["log_tail"][-1].startswith("ImportError")
