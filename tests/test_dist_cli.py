"""`lorakit train --nproc 2`: the real CLI re-launched through torchrun, full fine-tuning under FSDP2
(gloo on CPU), against the same config trained in this process with twice the accumulation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _tol import approx, tol
from _method_runs import make_workdir
from safetensors.torch import load_file

from lorakit.config import load_config
from lorakit.run import run_training
from test_cli_train import ENV, ROWS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer folder, 32 prompt/completion rows and a full fine-tuning config."""
    root = make_workdir(tmp_path_factory.mktemp("dist_cli"), ROWS, vocab_size=320)
    recipe = {"name": "full", "model": {"name_or_path": str(root / "base")}, "method": {"name": "full"},
              "data": {"source": str(root / "rows.jsonl"), "val_fraction": 0.125, "max_length": 64},
              "train": {"lr": 1e-3, "epochs": 2, "micro_batch_size": 4, "grad_accum": 1, "save_every": 2,
                        "progress": "plain", "dist_timeout_s": 60}}
    (root / "full.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.mark.timeout(240)
def test_nproc_2_full_fine_tuning_matches_one_process(workdir, one_thread):
    command = [sys.executable, "-m", "lorakit", "train", "full.yaml", "--nproc", "2", "--output_dir", "two"]
    done = subprocess.run(command, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("done: ") == 1  # rank 0 alone reports
    two = workdir / "two" / "full"

    overrides = [("train.grad_accum", 2), ("output_dir", str(workdir / "one")), ("train.progress", "none")]
    cfg = load_config(workdir / "full.yaml", overrides=overrides)
    one = run_training(cfg, log=lambda text: None).run_dir

    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in expected] == list(range(1, 9))  # 7 micro-batches: 4 steps per epoch
    for got, want in zip(records, expected):
        assert got["loss"] == approx(want["loss"], reduction=512, steps=8)  # vocabulary 320, ~500 tokens a step
    ours, reference = load_file(str(two / "model" / "model.safetensors")), load_file(
        str(one / "model" / "model.safetensors"))
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], msg=name, **tol(reduction=512, steps=8, scale=1e-3 * 8))
    assert (two / "report.md").is_file() and (two / "model" / "tokenizer.json").is_file()
