"""Issue 18: a run survives kills and full disks, the server holds its limits, configs take other tools' names.

Real code paths throughout: the `lorakit` CLI (in this process where an exit code and its one line are
all that is checked; in a child process where the child must be SIGKILLed mid-write or run under
RLIMIT_FSIZE), the training loop, the checkpoint writer, the FastAPI app and the model loaders.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _method_runs import ROWS, WORDS, make_workdir
from _tiny import CHATML, tiny_tokenizer
from conftest import tiny_llama
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from starlette.requests import Request
from train_fixtures import TEST_THREADS, run_tiny

import lorakit
from lorakit import cli
from lorakit.adapters import Bottleneck, Full, LoRA
from lorakit.commands.configargs import config_from_args
from lorakit.config import build_config, save_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.infer.api import APIError, ServerConfig, read_json
from lorakit.infer.server import create_app
from lorakit.train import TrainConfig, read_metrics
from lorakit.train import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
COMPARED = ("step", "loss", "lr", "trained_tokens")  # metrics that do not depend on the clock


def compared(run_dir: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer, 12 rows (3 steps an epoch) and a 3-epoch LoRA config checkpointing every 2 steps."""
    root = make_workdir(tmp_path_factory.mktemp("reliability"), ROWS, vocab_size=320)
    recipe = {"name": "r", "model": {"name_or_path": str(root / "base")},
              "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
              "data": {"source": str(root / "rows.jsonl"), "val_fraction": 0.0, "max_length": 48},
              "train": {"lr": 1e-2, "epochs": 3, "micro_batch_size": 4, "save_every": 2, "progress": "plain"}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """The uninterrupted run, in this process (one torch thread, as the children)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    try:
        assert cli.main(["train", str(workdir / "r.yaml"), "--output_dir", str(workdir / "ref")]) == 0
    finally:
        torch.set_num_threads(threads)
    return workdir / "ref" / "r"


def child(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`lorakit` in a child process, `code` run first (it wraps a function of the checkpoint writer)."""
    return subprocess.run([sys.executable, "-c", code + "\nfrom lorakit.cli import main\nsys.exit(main(sys.argv[1:]))",
                           *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- checkpoints and runs


def test_checkpoints_by_default_every_10_minutes_keep_2_and_none_for_a_short_run(tmp_path):
    cfg = TrainConfig()
    assert (cfg.save_every, cfg.save_every_minutes, cfg.keep_checkpoints) == (0, 10.0, 2)
    summary, _ = run_tiny(tmp_path / "short", epochs=1)
    assert summary.steps == 4 and not (tmp_path / "short" / "checkpoints").exists()  # a short run writes none


def test_time_based_checkpoints_stretch_with_a_slow_disk_and_the_run_ends_with_one(tmp_path, monkeypatch):
    written, write = [], ckpt.write_checkpoint

    def slow_write(*args, **kwargs):  # a 0.3 s checkpoint: the interval becomes at least 20 x 0.3 = 6 s
        time.sleep(0.3)
        return write(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_checkpoint", slow_write)
    run_tiny(tmp_path, epochs=2, save_every_minutes=1e-9, keep_checkpoints=0,
             on_checkpoint=lambda folder: written.append(folder.name))
    assert written == ["step-1", "step-8"]  # due at once, then not for 6 s; the last step: it has checkpoints
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-8\n"


def test_a_kill_during_the_first_checkpoint_write_resumes_from_step_0(workdir, reference, one_thread, capsys):
    killed = child("""
import os, signal, sys
from lorakit.train import checkpoint
fsync = checkpoint._fsync
def fsync_then_die(path):  # SIGKILL with two of the first checkpoint's five files on disk
    fsync(path)
    if path.name == "optimizer.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._fsync = fsync_then_die""", "train", "r.yaml", "--output_dir", str(workdir / "killed"), cwd=workdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = workdir / "killed" / "r"
    assert [p.name.split(".")[0] for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]  # step-2.tmp-*
    assert not (run_dir / "checkpoints" / "latest").exists()

    assert cli.main(["train", str(workdir / "r.yaml"), "--output_dir", str(workdir / "killed")]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert cli.main(["train", str(run_dir), "--resume"]) == 0
    assert (f"resume: {run_dir} holds no complete checkpoint (the run stopped before its first one was written): "
            "training starts again from step 0") in capsys.readouterr().err
    assert compared(run_dir) == compared(reference)  # the whole run, from step 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-8", "step-9"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_kill_between_a_checkpoint_and_its_pointer_or_mid_prune_loses_nothing(tmp_path, monkeypatch):
    run_tiny(tmp_path, epochs=1, save_every=2, keep_checkpoints=0)
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()  # a kill after step-4's rename, before its pointer
    assert ckpt.resolve_resume(tmp_path, True) == root / "step-4"
    (root / "latest").write_text("step-6\n")  # a pointer to a folder that is gone
    assert ckpt.resolve_resume(tmp_path, True) == root / "step-4"

    def killed_rmtree(path, *args, **kwargs):
        raise KeyboardInterrupt  # a kill while the old checkpoint is being deleted

    (root / "latest").write_text("step-4\n")
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(root, keep=1)
    monkeypatch.undo()
    assert [p.name for p in ckpt.step_dirs(root)] == ["step-4"]  # step-2 went to a leftover name first
    ckpt.remove_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-4"]


def test_a_kill_while_config_yaml_is_written_leaves_a_folder_free_for_a_fresh_run(tmp_path):
    run_dir = tmp_path / "run"
    assert not ckpt.holds_a_run(run_dir)
    run_dir.mkdir()
    (run_dir / ".config.yaml.tmp-k1ll3d").write_text("name: x\nout")  # save_config's temporary file, cut short
    assert not ckpt.holds_a_run(run_dir)
    save_config(build_config({}), run_dir / "config.yaml")
    assert ckpt.holds_a_run(run_dir)


def test_resume_of_a_missing_run_folder_says_so(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "runs" / "nope"), "--resume"]) == 2
    assert capsys.readouterr().err == f"error: cannot resume: run folder '{tmp_path / 'runs' / 'nope'}' does not exist\n"
    with pytest.raises(LorakitError, match=f"^resume: {tmp_path / 'gone'} does not exist$"):
        ckpt.resolve_resume(tmp_path, tmp_path / "gone")


def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_resumes(
        workdir, reference, one_thread, capsys):
    full = child("""
import resource, signal, sys
from lorakit.train import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG (Python's default too)
write = checkpoint.write_checkpoint
def write_then_fill(*args, **kwargs):  # after the first checkpoint, no file may grow past 8 kB
    path = write(*args, **kwargs)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, resource.RLIM_INFINITY))
    return path
checkpoint.write_checkpoint = write_then_fill""", "train", "r.yaml", "--output_dir", str(workdir / "full"), cwd=workdir)
    root = workdir / "full" / "r" / "checkpoints"
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert full.stderr.splitlines()[-1] == (
        f"error: could not write checkpoint {root / 'step-4'}: trainable.safetensors: File too large; the previous "
        f"checkpoint {root / 'step-2'} is intact (continue from it with --resume once there is room)")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]  # nothing of step-4 is left

    assert cli.main(["train", str(root.parent), "--resume"]) == 0
    capsys.readouterr()
    assert compared(root.parent) == compared(reference)
    ours, theirs = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (root.parent, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_extending_a_finished_run_follows_the_schedule_of_its_new_length(tmp_path, capsys):
    common = dict(save_every=2, keep_checkpoints=0, progress="plain")
    run_tiny(tmp_path / "const", epochs=1, **common)  # 4 steps, then 4 more: a constant lr replays a 2-epoch run
    summary, extended = run_tiny(tmp_path / "const", epochs=2, resume=True, **common)
    _, fresh = run_tiny(tmp_path / "fresh", epochs=2, **common)
    assert summary.steps == 8 and summary.resumed_from.endswith("step-4")
    assert compared(tmp_path / "const") == compared(tmp_path / "fresh")
    assert all(torch.equal(a, b) for a, b in zip(extended.parameters(), fresh.parameters()))

    cosine = dict(common, schedule="cosine", warmup_steps=1)
    run_tiny(tmp_path / "cos", epochs=1, **cosine)
    capsys.readouterr()
    run_tiny(tmp_path / "cos", epochs=2, max_steps=6, resume=True, **cosine)
    assert ("resume: the run's length changes from 4 to 6 steps; from step 5 on it follows the cosine schedule of a "
            "6-step run (lr 0 -> 0.00345)") in capsys.readouterr().err
    run_tiny(tmp_path / "cos6", epochs=2, max_steps=6, **cosine)
    run_tiny(tmp_path / "cos4", epochs=1, **cosine)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "cos" / "metrics.jsonl")]
    assert lrs[:4] == [r["lr"] for r in read_metrics(tmp_path / "cos4" / "metrics.jsonl")]  # as it was
    assert lrs[4:] == [r["lr"] for r in read_metrics(tmp_path / "cos6" / "metrics.jsonl")][4:]  # the 6-step run's


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, mask):
    before = os.umask(mask)
    try:
        run_tiny(tmp_path / "run", epochs=1, save_every=2)
        adapters = {name: lorakit.save_adapter(lorakit.apply(tiny_llama(), cfg), tmp_path / name)
                    for name, cfg in [("lora", LoRA(r=2)), ("bottleneck", Bottleneck()), ("full", Full())]}
        save_config(build_config({}), tmp_path / "cfg" / "config.yaml")
    finally:
        os.umask(before)
    root = tmp_path / "run" / "checkpoints"
    folders = [root / "step-2", root / "step-4"]
    files = [root / "latest", *(p for f in folders for p in f.iterdir()), tmp_path / "cfg" / "config.yaml",
             adapters["lora"] / "adapter_model.safetensors", adapters["bottleneck"] / "adapter_model.safetensors",
             adapters["full"] / "model.safetensors"]
    assert {p.name: _mode(p) for p in folders} == {p.name: 0o777 & ~mask for p in folders}
    assert {str(p): _mode(p) for p in files} == {str(p): 0o666 & ~mask for p in files}
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == ["config.yaml"]  # no temporary file left


# ----------------------------------------------------------------------------- server


class _Counted:
    """An ASGI `receive` that streams a chunked body of `total` bytes and counts what was taken."""

    def __init__(self, total: int, chunk: int = 65536) -> None:
        self.left, self.chunk, self.taken = total, chunk, 0

    async def __call__(self) -> dict:
        size = min(self.chunk, self.left)
        self.left -= size
        self.taken += size
        return {"type": "http.request", "body": b"x" * size, "more_body": self.left > 0}


def test_a_chunked_body_is_cut_off_at_the_limit_while_it_streams_in():
    import asyncio

    cfg = ServerConfig(max_body_bytes=1_000_000)
    receive = _Counted(4_000_000)  # four times the limit, no Content-Length
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
    with pytest.raises(APIError) as error:
        asyncio.run(read_json(Request(scope, receive), cfg))
    assert error.value.status == 413 and error.value.code == "request_too_large"
    assert receive.taken <= cfg.max_body_bytes + receive.chunk  # reading stopped at the limit


def test_a_chunked_body_over_the_limit_gets_413_from_the_app():
    model, tokenizer = tiny_llama(vocab_size=320), tiny_tokenizer(CHATML)
    app = create_app(model, tokenizer, ServerConfig(max_body_bytes=10_000, window_ms=1))

    def body():
        for _ in range(40):  # 40 kB in 1 kB chunks: Transfer-Encoding chunked, no Content-Length
            yield b"x" * 1000

    with TestClient(app) as client:
        response = client.post("/v1/completions", content=body())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_taken_port_is_one_line_before_any_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: cannot serve on 127.0.0.1:{port}: Address already in use; another server is "
                            "using it: choose another with --port\n")
    assert captured.out == ""  # no "serving ..." line for an address that is not ours


def test_the_serving_line_comes_once_the_port_is_bound(monkeypatch, capsys):
    import uvicorn

    seen = {}

    def run(server, sockets):  # instead of serving forever: the announced port must already accept connections
        port = int(capsys.readouterr().out.strip().splitlines()[-1].rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            seen["port"] = port
        assert sockets[0].getsockname()[1] == port

    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert cli.main(["serve", "--port", "0"]) == 0
    assert seen["port"] > 0


# ----------------------------------------------------------------------------- configs and models


def _train_args(*argv: str) -> argparse.Namespace:
    """The `lorakit train` command line parsed by the real parser."""
    parser, _ = cli.build_parser(["train", *argv])
    args, extra = parser.parse_known_args(["train", *argv])
    args.extra = extra
    return args


def test_names_from_other_tools_are_aliases_with_a_note(tmp_path, capsys):
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump({
        "learning_rate": 3e-4, "num_train_epochs": 2, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4, "warmup_ratio": 0.1, "lora_r": 4, "lora_alpha": 8,
        "method": {"lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "embedded-train", "sequence_len": 32}}))
    cfg, _ = config_from_args(_train_args(str(tmp_path / "hf.yaml"), "--max_seq_length", "48", "lr_scheduler_type=linear"))
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.micro_batch_size, cfg.train.grad_accum) == (3e-4, 2, 2, 4)
    assert (cfg.train.warmup_ratio, cfg.train.schedule, cfg.data.max_length) == (0.1, "linear", 48)
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout, cfg.method.targets) == (4, 8.0, 0.05, ["q_proj", "v_proj"])
    notes = capsys.readouterr().err.splitlines()
    assert "note: 'learning_rate' read as lorakit's 'train.lr'" in notes
    assert "note: 'method.target_modules' read as lorakit's 'method.targets'" in notes
    assert "note: 'max_seq_length' read as lorakit's 'data.max_length'" in notes  # the command line wins
    with pytest.raises(ConfigError, match=r"^'learning_rate' \(0.001\) and 'train.lr' \(0.0002\) are both given"):
        build_config({"learning_rate": 1e-3, "train": {"lr": 2e-4}})
    with pytest.raises(ConfigError, match=r"^'train.lr' is given twice \('1e-3' as 'learning_rate' and '2e-3' as"):
        config_from_args(_train_args("--learning_rate", "1e-3", "--train.lr", "2e-3"))


def test_a_shipped_recipe_on_the_users_rows_drops_its_validation_set(tmp_path, capsys):
    """`lorakit train data.source=mine.jsonl` (the quickstart recipe): its validation set is the embedded one, so
    it goes, with a note; its format stays (rows that do not fit it get an error naming the format they look like);
    a validation set the user gives stays; the user's own YAML keeps every key."""
    cfg, _ = config_from_args(_train_args("data.source=mine.jsonl"))
    assert (cfg.data.source, cfg.data.format, cfg.data.val_source) == ("mine.jsonl", "prompt_completion", None)
    assert capsys.readouterr().err == (
        "note: data.source is not the recipe's, so its validation set data.val_source='embedded-eval' is not used: no "
        "validation unless you give one (data.val_source, data.val_split or data.val_fraction)\n")
    cfg, _ = config_from_args(_train_args("--data.source", "mine.jsonl", "--data.val_source", "val.jsonl"))
    assert cfg.data.val_source == "val.jsonl" and capsys.readouterr().err == ""
    cfg, _ = config_from_args(_train_args("data.source=embedded-train"))  # the recipe's own rows: nothing goes
    assert cfg.data.val_source == "embedded-eval"
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"data": {"source": "a.jsonl", "format": "alpaca", "val_source": "b.jsonl"}}))
    cfg, _ = config_from_args(_train_args(str(own), "data.source=c.jsonl"))
    assert (cfg.data.source, cfg.data.format, cfg.data.val_source) == ("c.jsonl", "alpaca", "b.jsonl")
    assert capsys.readouterr().err == ""
    rows = tmp_path / "alpaca.jsonl"
    rows.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "red"}) + "\n")
    assert cli.main(["train", f"data.source={rows}", "train.max_steps=1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {rows} line 1: field 'prompt' is missing (columns: instruction, input, output); data.format is "
        "prompt_completion, but these columns look like alpaca rows: set data.format=alpaca (or auto)")


def test_every_unknown_key_is_reported_at_once_with_its_closest_key_or_alias(tmp_path, capsys):
    assert cli.main(["train", "--method.rnak", "8"]) == 2
    assert capsys.readouterr().err == ("error: unknown key 'method.rnak' for method 'lora'; did you mean 'method.r' "
                                       "(alias 'rank')?\n")
    assert cli.main(["train", "train.learnig_rate=1e-4"]) == 2
    assert capsys.readouterr().err == ("error: unknown key 'train.learnig_rate'; did you mean 'train.lr' "
                                       "(alias 'learning_rate')?\n")
    (tmp_path / "typos.yaml").write_text(yaml.safe_dump({"train": {"epoch": 1}, "data": {"max_lenght": 8}}))
    assert cli.main(["train", "--method.rnak", "8", str(tmp_path / "typos.yaml"), "--train.learnig_rate", "1"]) == 2
    assert capsys.readouterr().err == (
        "error: 4 unknown keys: 'data.max_lenght': did you mean 'data.max_length'?; 'train.epoch': did you mean "
        "'train.epochs'?; 'train.learnig_rate': did you mean 'train.lr' (alias 'learning_rate')?; 'method.rnak' "
        "for method 'lora': did you mean 'method.r' (alias 'rank')?\n")
    assert cli.main(["train", "--train.max_length", "8"]) == 2  # a key of another section
    assert capsys.readouterr().err == "error: unknown key 'train.max_length'; did you mean 'data.max_length'?\n"


def test_an_unreachable_hub_fails_within_seconds(monkeypatch):
    import huggingface_hub

    from lorakit.models import hub_unreachable, load_model, load_tokenizer

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        hub_unreachable.cache_clear()
        started = time.monotonic()
        for load in (load_tokenizer, load_model):
            with pytest.raises(LorakitError) as error:
                load("lorakit-tests/not-a-cached-model")
            assert str(error.value).endswith(
                f"loading it from the Hugging Face hub failed (no network, or no such repository?): the hub at "
                f"{endpoint} did not answer within 3 s (timed out), and it is not in the local cache")
        hub_unreachable.cache_clear()
    assert time.monotonic() - started < 10


def test_resume_through_the_cli_may_extend_the_run(workdir, reference, one_thread, capsys):
    """`lorakit train RUN --resume --train.epochs N`: the run's length is one of the keys a resume may change."""
    run = workdir / "extend"
    assert cli.main(["train", str(workdir / "r.yaml"), "--output_dir", str(run), "--train.epochs", "2"]) == 0
    assert cli.main(["train", str(run / "r"), "--resume", "--train.epochs", "3"]) == 0
    assert "resume: the run's length changes from 6 to 9 steps" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run / "r" / "metrics.jsonl")] == list(range(1, 10))
    assert cli.main(["train", str(run / "r"), "--resume", "--train.micro_batch_size", "2"]) == 2
    assert "cannot resume with a different config (train.micro_batch_size: 4 -> 2)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a DPO run killed and resumed

PREF_ROWS = [{"prompt": f"Copy the word {w}.", "chosen": f" {w} {w}", "rejected": f" {v}"}
             for w, v in zip(WORDS, reversed(WORDS))]
DPO_COMPARED = (*COMPARED, "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def dpo_recipe(workdir: Path, layout: str) -> Path:
    """A 3-epoch LoRA DPO config on 12 pairs (3 steps an epoch) checkpointing every 2 steps, in the padded or the
    shared-prompt pair layout (data.packing false or true)."""
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PREF_ROWS))
    recipe = {"name": f"dpo-{layout}", "model": {"name_or_path": str(workdir / "base")},
              "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
              "data": {"source": str(workdir / "pairs.jsonl"), "max_length": 48, "packing": layout == "shared"},
              "train": {"objective": "dpo", "beta": 0.5, "lr": 1e-2, "epochs": 3, "micro_batch_size": 4,
                        "save_every": 2, "progress": "plain"}}
    path = workdir / f"dpo-{layout}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_a_dpo_run_killed_mid_step_after_a_checkpoint_resumes_bit_identically(workdir, layout, one_thread, capsys):
    """SIGKILL inside step 5 (after its backward pass, before its update), the run's last checkpoint being step 4:
    --resume continues from step-4 and ends with the uninterrupted run's losses, reward metrics and adapter, bit for
    bit (the reference model, the adapter switched off, is the same initial model after the restart)."""
    recipe = dpo_recipe(workdir, layout)
    assert cli.main(["train", str(recipe), "--output_dir", str(workdir / "dpo-ref")]) == 0
    reference = workdir / "dpo-ref" / recipe.stem
    killed = child("""
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
steps = []
def die_in_step_5(optimizer, args, kwargs):  # after step 5's forward and backward passes, before its update
    steps.append(len(steps) + 1)
    if len(steps) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_pre_hook(die_in_step_5)""", "train", recipe.name, "--output_dir", str(workdir / "dpo-killed"),
                   cwd=workdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = workdir / "dpo-killed" / recipe.stem
    assert ckpt.read_pointer(run_dir / "checkpoints") == run_dir / "checkpoints" / "step-4"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (run_dir / "adapter").exists()

    capsys.readouterr()
    assert cli.main(["train", str(run_dir), "--resume"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "step-4")  # not a fresh start from step 0
    ours, theirs = (read_metrics(d / "metrics.jsonl") for d in (run_dir, reference))
    assert [{k: r[k] for k in DPO_COMPARED} for r in ours] == [{k: r[k] for k in DPO_COMPARED} for r in theirs]
    assert [r["step"] for r in ours] == list(range(1, 10)) and ours[-1]["rewards/margins"] > 0
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, reference)]
    assert adapters[0].keys() == adapters[1].keys() and all(torch.equal(adapters[0][k], adapters[1][k])
                                                            for k in adapters[1])


# ----------------------------------------------------------------------------- a GRPO run killed and resumed

GRPO_COMPARED = (*COMPARED, "reward", "reward_std", "rewards/length_penalty/mean", "rewards/contains/mean",
                 "completions/mean_length", "completions/clipped_ratio", "kl")


def grpo_recipe(workdir: Path) -> Path:
    """A 3-epoch LoRA GRPO config on 12 prompts (3 steps an epoch, 4 prompts x 4 sampled completions a step) with a
    KL penalty to the adapter switched off, checkpointing every 2 steps."""
    (workdir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": row["prompt"], "answer": row["completion"]})
                                                   + "\n" for row in ROWS))
    recipe = {"name": "grpo", "model": {"name_or_path": str(workdir / "base")},
              "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
              "data": {"source": str(workdir / "prompts.jsonl"), "max_length": 24},
              "train": {"objective": "grpo", "rewards": [{"name": "length_penalty", "target_length": 6,
                                                          "max_length": 30}, "contains"],
                        "num_generations": 4, "max_completion_length": 6, "grpo_beta": 0.1, "lr": 1e-2, "epochs": 3,
                        "micro_batch_size": 4, "save_every": 2, "progress": "plain"}}
    path = workdir / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_grpo_run_killed_mid_step_after_a_checkpoint_resumes_bit_identically(workdir, one_thread, capsys):
    """SIGKILL inside step 5 (after its sampling, forward and backward passes, before its update), the last checkpoint
    being step 4: --resume samples step 5's completions again from the same per-completion seeds and ends with the
    uninterrupted run's rewards, losses and adapter, bit for bit."""
    recipe = grpo_recipe(workdir)
    assert cli.main(["train", str(recipe), "--output_dir", str(workdir / "grpo-ref")]) == 0
    reference = workdir / "grpo-ref" / recipe.stem
    killed = child("""
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
steps = []
def die_in_step_5(optimizer, args, kwargs):  # after step 5's rollout, forward and backward passes, before its update
    steps.append(len(steps) + 1)
    if len(steps) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_pre_hook(die_in_step_5)""", "train", recipe.name, "--output_dir", str(workdir / "grpo-killed"),
                   cwd=workdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = workdir / "grpo-killed" / recipe.stem
    assert ckpt.read_pointer(run_dir / "checkpoints") == run_dir / "checkpoints" / "step-4"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]

    capsys.readouterr()
    assert cli.main(["train", str(run_dir), "--resume"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "step-4")
    ours, theirs = (read_metrics(d / "metrics.jsonl") for d in (run_dir, reference))
    assert [{k: r[k] for k in GRPO_COMPARED} for r in ours] == [{k: r[k] for k in GRPO_COMPARED} for r in theirs]
    assert [r["step"] for r in ours] == list(range(1, 10)) and ours[-1]["kl"] > 0  # the adapter moved off its base
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, reference)]
    assert adapters[0].keys() == adapters[1].keys() and all(torch.equal(adapters[0][k], adapters[1][k])
                                                            for k in adapters[1])
