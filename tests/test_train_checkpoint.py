"""Checkpoints: atomic writes, safe formats, and resumes that replay an uninterrupted run exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, read_metrics
from lorakit.train import checkpoint as ckpt
from lorakit.train.setup import build_optimizer
from train_fixtures import TEST_THREADS, freeze_except, resume_scenario, run_tiny, tiny_llama

TIMING_KEYS = {"elapsed", "tokens_per_s"}  # wall-clock columns differ between any two runs


def _comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def _assert_same_metrics(a: Path, b: Path) -> None:
    left, right = _comparable(a), _comparable(b)
    assert [r["step"] for r in left] == [r["step"] for r in right]
    for x, y in zip(left, right):
        assert x.keys() == y.keys()
        assert x == y  # a resumed run replays the same arithmetic: bit-exact metrics


def _model():
    return freeze_except(tiny_llama(seed=0, dropout=0.2), "q_proj", "v_proj", "norm")  # dropout: RNG matters


SETTINGS = dict(epochs=2, lr=1e-2, schedule="cosine", warmup_steps=2, weight_decay=0.1, log_every=3,
                eval_every=5, eval_examples=4, save_every=2, keep_checkpoints=0, seed=5,
                base_dropout="keep")  # the base's dropout stays on: resume must restore the RNG


class Interrupt(Exception):
    """Stands in for a crash right after a checkpoint."""


def test_resume_from_an_older_checkpoint_replays_the_run_exactly(tmp_path):
    _, reference = run_tiny(tmp_path / "a", model=_model(), **SETTINGS)

    def stop_at_step_6(folder: Path) -> None:
        if folder.name == "step-6":
            raise Interrupt

    with pytest.raises(Interrupt):
        run_tiny(tmp_path / "b", model=_model(), on_checkpoint=stop_at_step_6, **SETTINGS)
    assert max(r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")) == 6
    # step 4 is not a logging step (log_every=3): the loss accumulated since step 3 must survive
    summary, resumed = run_tiny(tmp_path / "b", model=_model(), resume=tmp_path / "b" / "checkpoints" / "step-4",
                                **SETTINGS)
    _assert_same_metrics(tmp_path / "a", tmp_path / "b")
    for (name, x), (_, y) in zip(reference.named_parameters(), resumed.named_parameters()):
        assert torch.equal(x, y), name  # the same arithmetic replayed: bit-exact
    assert summary.steps == 8 and summary.resumed_from.endswith("step-4")


def _wait_for_checkpoint(root: Path, at_least: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        latest = ckpt.read_pointer(root) if root.is_dir() else None
        if latest is not None and int(latest.name.split("-")[1]) >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint >= step {at_least} appeared (child exit code {process.poll()})")


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    script = [sys.executable, str(Path(__file__).with_name("train_fixtures.py"))]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    with open(tmp_path / "child.log", "w") as log:
        victim = subprocess.Popen(script + [str(killed), "--step-delay", "0.08"], stdout=log, stderr=log)
        try:
            _wait_for_checkpoint(killed / "checkpoints", 4, victim)
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        assert victim.returncode == -signal.SIGKILL
        assert not (killed / "summary.json").exists()  # it died mid-run
        resumed = subprocess.Popen(script + [str(killed), "--resume"], stdout=log, stderr=log)
        threads = torch.get_num_threads()
        torch.set_num_threads(TEST_THREADS)  # the same arithmetic as the children
        try:
            resume_scenario(reference)  # the uninterrupted run, here while the child resumes
        finally:
            torch.set_num_threads(threads)
        assert resumed.wait() == 0, (tmp_path / "child.log").read_text()
    _assert_same_metrics(reference, killed)
    assert len(_comparable(killed)) == 9
    assert read_metrics(killed / "metrics.jsonl")[-1]["step"] == 9
    final_ref = load_file(str(reference / "final_trainable.safetensors"))
    final_resumed = load_file(str(killed / "final_trainable.safetensors"))
    assert final_ref.keys() == final_resumed.keys()
    for name in final_ref:
        assert torch.equal(final_ref[name], final_resumed[name]), name  # bit-exact after SIGKILL


@pytest.mark.parametrize("fail_in", ["state.json", "latest pointer"])
def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, fail_in):
    settings = dict(epochs=1, save_every=1, keep_checkpoints=0)
    root = tmp_path / "run" / "checkpoints"
    real_json, real_pointer = ckpt._write_json, ckpt._write_pointer

    def failing_json(path, value):
        if path.name == "state.json" and value["loop"]["step"] == 2:
            raise OSError("disk full (simulated)")
        real_json(path, value)

    def failing_pointer(root_dir, name):
        if name == "step-2":
            raise OSError("disk full (simulated)")
        real_pointer(root_dir, name)

    if fail_in == "state.json":
        monkeypatch.setattr(ckpt, "_write_json", failing_json)
    else:
        monkeypatch.setattr(ckpt, "_write_pointer", failing_pointer)
    with pytest.raises(ckpt.CheckpointWriteError, match=rf"^could not write checkpoint {root / 'step-2'}: "
                       rf"{'state.json' if fail_in == 'state.json' else 'latest'}: disk full \(simulated\); "
                       rf"the previous checkpoint {root / 'step-1'} is intact"):
        run_tiny(tmp_path / "run", **settings)
    monkeypatch.undo()

    assert (root / "latest").read_text().strip() == "step-1"
    expected = ["latest", "step-1"] if fail_in == "state.json" else ["latest", "step-1", "step-2"]
    assert sorted(p.name for p in root.iterdir()) == expected  # no half-written folder left behind
    assert ckpt.read_checkpoint(root / "step-1").state["loop"]["step"] == 1
    (root / "step-3.tmp-killed").mkdir()  # what a SIGKILL during a write leaves
    (root / "step-3.tmp-killed" / "trainable.safetensors").write_bytes(b"\0garbage")

    summary, _ = run_tiny(tmp_path / "run", resume=True, **settings)
    run_tiny(tmp_path / "clean", **settings)
    assert summary.resumed_from == str(root / "step-1")
    _assert_same_metrics(tmp_path / "clean", tmp_path / "run")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1", "step-2", "step-3", "step-4"]


def test_checkpoints_hold_only_trainable_weights_in_safe_formats_and_are_pruned(tmp_path):
    model = _model()
    run_tiny(tmp_path, model=model, epochs=1, save_every=1, keep_checkpoints=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-3", "step-4"]
    assert (root / "latest").read_text() == "step-4\n"
    files = sorted(p.name for p in (root / "step-4").iterdir())
    assert files == ["optimizer.json", "optimizer.safetensors", "rng.safetensors", "state.json",
                     "trainable.safetensors"]
    weights = load_file(str(root / "step-4" / "trainable.safetensors"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert weights.keys() == trainable.keys()
    for name, value in weights.items():
        assert torch.equal(value, trainable[name])


def test_optimizer_state_round_trips_by_parameter_name(tmp_path):
    model = _model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cfg = TrainConfig(weight_decay=0.1, betas=(0.8, 0.95))
    optimizer = build_optimizer(named, cfg)
    for _ in range(2):
        for _, p in named:
            p.grad = torch.randn_like(p)
        optimizer.step()
    names = {id(p): n for n, p in named}
    tensors, meta = ckpt.optimizer_state(optimizer, names)
    fresh = build_optimizer(named, TrainConfig())
    ckpt.load_optimizer_state(fresh, names, tensors, meta, tmp_path)
    original, restored = optimizer.state_dict(), fresh.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for index, entries in original["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, restored["state"][index][key]), (index, key)

    other = build_optimizer([(n + ".x", p) for n, p in named], cfg)
    with pytest.raises(LorakitError, match="does not fit this model's trainable parameters"):
        ckpt.load_optimizer_state(other, {id(p): n + ".x" for n, p in named}, tensors, meta, tmp_path)


def test_resume_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(LorakitError, match="resume: .*nowhere does not exist"):
        run_tiny(tmp_path / "empty", resume=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir(exist_ok=True)
    with pytest.raises(LorakitError, match="resume: no checkpoint found in"):
        run_tiny(tmp_path / "other", resume=tmp_path / "empty")
    run_tiny(tmp_path / "run", epochs=1, save_every=2)
    with pytest.raises(LorakitError, match="already holds checkpoints: pass resume"):
        run_tiny(tmp_path / "run", epochs=1, save_every=2)
    with pytest.raises(LorakitError, match="belongs to a run of 4 steps, this config plans 2, and its steps differ"):
        run_tiny(tmp_path / "run", epochs=1, save_every=2, micro_batch_size=8, resume=True)
    with pytest.raises(LorakitError, match="is at step 4, past the 3 steps this config plans"):
        run_tiny(tmp_path / "run", epochs=1, max_steps=3, save_every=2, resume=True)
    assert ckpt.resolve_resume(tmp_path, tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-4"
    assert os.path.samefile(ckpt.resolve_resume(tmp_path, tmp_path / "run" / "checkpoints" / "step-2"),
                            tmp_path / "run" / "checkpoints" / "step-2")
