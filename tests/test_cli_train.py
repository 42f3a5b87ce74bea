"""End to end: the real `lorakit train` process on a tiny Llama saved to a temporary folder.

One LoRA run is the reference for several checks (falling loss, what trained, PEFT parity,
the run folder); a second copy of it is SIGKILLed after its first checkpoint and resumed, and
must reproduce the reference's metrics exactly. A full fine-tuning run goes through the same
loop. Process count is kept low: each CLI start pays several seconds of imports.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from _tol import TINY, approx, tol
from train_fixtures import TEST_THREADS
from _method_runs import make_workdir
from lorakit.config import config_to_dict, load_config
from lorakit.data import load_rows, make_batches, tokenize_rows

WORDS = ("apple river stone cloud tiger piano garden silver window forest candle rocket mirror ocean pepper "
         "violin castle desert button lemon planet shadow bridge marble falcon harbor jungle meadow copper "
         "velvet thunder orbit").split()
ROWS = [{"prompt": f"Copy the word {w}.", "completion": f" {w} {w}"} for w in WORDS]
COMPARED = ("step", "loss", "lr", "eval_loss", "trained_tokens")  # metrics that do not depend on the clock
ENV = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def lorakit_process(*args: str, cwd: Path) -> subprocess.Popen:
    """Start the real CLI (`python -m lorakit.cli`, what the console script runs)."""
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_lorakit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    process = lorakit_process(*args, cwd=cwd)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compared(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in records]




@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama + byte-level BPE tokenizer folder, a prompt/completion jsonl and a run config."""
    root = make_workdir(tmp_path_factory.mktemp("cli_train"), ROWS, vocab_size=320)
    recipe = {
        "name": "lora",
        "model": {"name_or_path": str(root / "base")},
        "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
        "data": {"source": str(root / "rows.jsonl"), "val_fraction": 0.125, "max_length": 64},
        "train": {"lr": 1e-2, "epochs": 12, "micro_batch_size": 4, "save_every": 5, "eval_every": 20,
                  "progress": "plain"},
    }
    (root / "lora.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def lora_run(workdir) -> Path:
    """The reference LoRA run (uninterrupted), with one override given on the command line."""
    result = run_lorakit("train", "lora.yaml", "--output_dir", "ref", "train.seed=3", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir / "ref" / "lora"


def tiny_input(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def test_lora_run_loss_falls_and_only_adapter_weights_train(lora_run):
    records = metrics(lora_run)
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 84  # 12 epochs x 7 batches of 4 (28 training rows)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    latest = (lora_run / "checkpoints" / "latest").read_text().strip()
    trained = load_file(lora_run / "checkpoints" / latest / "trainable.safetensors")
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert len(trained) == 2 * 7 * 2  # A and B for the 7 linear layers of each of 2 blocks


def test_lora_adapter_loads_in_peft_with_equal_logits(lora_run, workdir):
    from peft import PeftModel

    adapter = lora_run / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(workdir / "base") and saved["r"] == 8
    ids = tiny_input(320)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "base"), adapter).eval()
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(workdir / "base"), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(workdir / "base").eval()
    with torch.no_grad():
        peft_logits, our_logits, base_logits = (m(input_ids=ids).logits for m in (peft_model, ours, base))
    torch.testing.assert_close(our_logits, peft_logits, **tol(reduction=TINY))
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter learned something


def test_final_eval_loss_is_reproduced_by_base_from_disk_plus_peft_adapter(lora_run, workdir):
    """The trained in-process model == the untouched base checkpoint + the saved adapter."""
    from peft import PeftModel

    cfg = load_config(lora_run / "config.yaml")
    tokenizer = lorakit.load_tokenizer(cfg.model.name_or_path)
    _, val_rows = load_rows(cfg.data)
    examples, _ = tokenize_rows(val_rows, tokenizer, cfg.data)
    batches = make_batches(examples, cfg.train.micro_batch_size, pack=False, max_length=cfg.data.max_length,
                           pad_id=tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "base"),
                                      lora_run / "adapter").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((batch["labels"] != -100).sum())
    final_eval = [r["eval_loss"] for r in metrics(lora_run) if r.get("eval_loss") is not None][-1]
    assert total / count == approx(final_eval, reduction=512)  # vocabulary 320, ~500 validation tokens


def test_run_folder_holds_config_report_curve_and_summary(lora_run, workdir):
    cfg = load_config(lora_run / "config.yaml")
    assert cfg.name == "lora" and cfg.output_dir == "ref" and cfg.train.seed == 3  # the CLI override
    assert config_to_dict(load_config(lora_run / "config.yaml")) == yaml.safe_load((lora_run / "config.yaml").read_text())
    summary = json.loads((lora_run / "summary.json").read_text())
    report = (lora_run / "report.md").read_text()
    assert f"trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}" in report
    assert "![loss curve](loss_curve.png)" in report
    assert (lora_run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (lora_run / "adapter" / "adapter_model.safetensors").is_file()


# The real CLI main, except that the first checkpoint write is followed by a long pause, so the
# SIGKILL lands mid-run however slowly the test process is scheduled on a busy machine (without
# it, a tiny run could finish between two polls).
PAUSE_AFTER_FIRST_CHECKPOINT = """
import sys, time
from lorakit.train import checkpoint
write = checkpoint.write_checkpoint
def write_then_pause(*args, **kwargs):
    path = write(*args, **kwargs)
    time.sleep(600)
    return path
checkpoint.write_checkpoint = write_then_pause
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_matches_the_uninterrupted_run(lora_run, workdir):
    process = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_CHECKPOINT, "train", "lora.yaml",
                                "--output_dir", "killed", "train.seed=3"], cwd=workdir, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = workdir / "killed" / "lora"
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "latest").exists():  # kill right after the first checkpoint
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()  # it really died mid-run
    assert len(metrics(run_dir)) < len(metrics(lora_run))

    resumed = run_lorakit("train", str(run_dir), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"]
    assert compared(metrics(run_dir)) == compared(metrics(lora_run))
    ours, reference = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, lora_run))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_full_fine_tuning_runs_through_the_same_loop(workdir):
    result = run_lorakit("train", "lora.yaml", "--method", "full", "--name", "full", "--train.lr", "1e-3",
                         "--train.epochs", "4", "--train.save_every", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "runs" / "full"
    losses = [r["loss"] for r in metrics(run_dir) if r.get("loss") is not None]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == {"name": "full"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(workdir / "base").eval()
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed
    assert lorakit.load_tokenizer(run_dir / "model")("Copy the word apple.")["input_ids"]


def test_base_weights_are_bitwise_unchanged_after_lora_training(workdir, tmp_path, one_thread):
    """In-process run_training (what the CLI calls): base tensors equal the checkpoint's bit for bit."""
    from lorakit.run import run_training

    cfg = load_config(workdir / "lora.yaml", [("output_dir", str(tmp_path)), ("train.max_steps", "10"),
                                               ("train.save_every", "0"), ("train.progress", "none")])
    result = run_training(cfg, log=lambda line: None)
    original = load_file(workdir / "base" / "model.safetensors")
    state = result.model.state_dict()
    adapter_keys = {k for k in state if ".lora_" in k}
    assert {k for k in state if k not in adapter_keys} == set(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert all(state[k].abs().max() > 0 for k in adapter_keys if ".lora_B." in k)  # B left its zero init


def test_real_process_errors_are_one_line_with_exit_code_2(workdir):
    unknown = run_lorakit("train", "lora.yaml", "--data.max_lenght", "3", cwd=workdir)
    assert unknown.returncode == 2
    assert unknown.stderr == "error: unknown key 'data.max_lenght'; did you mean 'data.max_length'?\n"

    (workdir / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [ROWS[0], ROWS[1], {"prompt": "x"}]))
    bad_row = run_lorakit("train", "lora.yaml", "--data.source", "bad.jsonl", "--data.val_fraction", "0",
                          "--name", "bad", cwd=workdir)
    assert bad_row.returncode == 2
    assert "Traceback" not in bad_row.stderr
    assert bad_row.stderr.splitlines()[-1] == "error: bad.jsonl line 3: field 'completion' is missing (columns: prompt)"
    assert not (workdir / "runs" / "bad").exists()  # a run that never started leaves no folder


def test_packed_and_accumulated_run_equals_one_padded_full_batch(workdir, tmp_path, one_thread):
    """Real process: packed rows, 1 per micro-batch, accumulated into one step per epoch. It must
    follow the same trajectory as an in-process run on one padded batch of every example."""
    from lorakit.run import run_training

    common = [("output_dir", str(tmp_path)), ("train.epochs", "3"), ("train.save_every", "0"),
              ("train.eval_every", "1"), ("train.lr", "1e-2")]
    packed = run_lorakit("train", "lora.yaml", *(f"{k}={v}" for k, v in common), "name=packed",
                         "data.packing=true", "train.micro_batch_size=1", "train.grad_accum=28", cwd=workdir)
    assert packed.returncode == 0, packed.stderr
    cfg = load_config(workdir / "lora.yaml", [*common, ("name", "padded"), ("train.micro_batch_size", "28"),
                                               ("train.grad_accum", "1"), ("train.progress", "none")])
    run_training(cfg, log=lambda line: None)
    ours, reference = metrics(tmp_path / "packed"), metrics(tmp_path / "padded")
    assert [r["step"] for r in ours] == [r["step"] for r in reference] == [1, 2, 3]
    for mine, theirs in zip(ours, reference):
        assert mine["trained_tokens"] == theirs["trained_tokens"]
        assert mine["loss"] == approx(theirs["loss"], reduction=2048, steps=3)  # ~1000 tokens a step
        assert mine["eval_loss"] == approx(theirs["eval_loss"], reduction=2048, steps=3)
