"""The training loop under torch.distributed: 2 CPU processes (gloo) against 1 process.

One torchrun launch runs four jobs (DDP and FSDP2, fresh and resumed from a 1-process checkpoint);
the 1-process references and resumes run here. A second launch, without torchrun's agent, kills
one rank and checks that the other ends with a clear error within the collective timeout.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tol import TINY, approx, tol
from dist_fixtures import FINAL, scenario
from lorakit.train import read_metrics
from lorakit.train import checkpoint as ckpt
from train_fixtures import TEST_THREADS

SCRIPT = str(Path(__file__).with_name("dist_fixtures.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
METHODS = {"ddp": "adapter", "fsdp": "full"}


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a / FINAL)), load_file(str(b / FINAL))
    assert left.keys() == right.keys()
    for name in left:  # 6 steps at lr 1e-2: the gap of reordered gradient sums, lr * steps in size
        torch.testing.assert_close(left[name], right[name], msg=name, **tol(reduction=TINY, steps=6, scale=1e-2 * 6))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1-process runs with grad_accum 4 (= 2 ranks x grad_accum 2), adapter-like and full."""
    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    try:
        for method in METHODS.values():
            scenario(root / method, method=method, grad_accum=4)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.timeout(240)
def test_two_ranks_match_one_process_and_checkpoints_move_between_them(tmp_path, references, one_thread):
    jobs = []
    for mode, method in METHODS.items():
        jobs += [{"run_dir": str(tmp_path / mode), "method": method, "distributed": mode, "dist_timeout_s": 60},
                 {"run_dir": str(tmp_path / f"{mode}-from-1"), "method": method, "distributed": mode,
                  "dist_timeout_s": 60, "resume": str(references / method / "checkpoints" / "step-2")}]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(_free_port()), SCRIPT, json.dumps(jobs)]
    done = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for mode, method in METHODS.items():
        reference, two = references / method, tmp_path / mode
        _assert_same_weights(two, reference)  # 2 ranks x accum 2 == 1 process x accum 4
        _assert_same_weights(tmp_path / f"{mode}-from-1", reference)  # 1-process checkpoint, resumed on 2
        records = read_metrics(two / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, 7))  # rank 0 alone writes metrics
        expected = read_metrics(reference / "metrics.jsonl")
        for got, want in zip(records, expected):
            assert got["trained_tokens"] == want["trained_tokens"]  # tokens counted over both ranks
            assert got["loss"] == approx(want["loss"], reduction=TINY, steps=6)
        assert [p.name for p in ckpt.step_dirs(two / "checkpoints")] == ["step-2", "step-4", "step-6"]
        # a 2-rank checkpoint (gathered from the shards under FSDP2) resumed in 1 process
        scenario(tmp_path / f"{mode}-to-1", method=method, grad_accum=4, resume=two / "checkpoints" / "step-4")
        _assert_same_weights(tmp_path / f"{mode}-to-1", reference)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_process(rank: int, port: int, jobs: list[dict], log: Path) -> subprocess.Popen:
    """One rank started by hand (no torchrun agent to tear the group down): only the timeout helps."""
    env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, SCRIPT, json.dumps(jobs)], env=env, stdout=handle, stderr=handle)


@pytest.mark.timeout(200)
def test_a_dead_rank_ends_the_other_with_a_clear_error_and_the_run_resumes(tmp_path, references, one_thread):
    run_dir, port = tmp_path / "run", _free_port()
    jobs = [{"run_dir": str(run_dir), "distributed": "ddp", "step_delay": 0.1, "dist_timeout_s": 20}]
    survivor = _rank_process(0, port, jobs, tmp_path / "rank0.log")
    victim = _rank_process(1, port, jobs, tmp_path / "rank1.log")
    try:
        deadline = time.monotonic() + 120
        while ckpt.read_pointer(run_dir / "checkpoints") is None and survivor.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        code = survivor.wait(timeout=90)  # the collective timeout is 20 s
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()
                process.wait()
    log = (tmp_path / "rank0.log").read_text()
    assert code != 0, log
    assert "rank 0 of 2: a collective failed, another rank probably died or hung" in log
    latest = ckpt.read_pointer(run_dir / "checkpoints")
    assert f"the last complete checkpoint is {latest}; continue with --resume" in log
    assert not (run_dir / "summary.json").exists()
    scenario(run_dir, grad_accum=4, resume=True)  # the last good checkpoint, finished in one process
    _assert_same_weights(run_dir, references / "adapter")
