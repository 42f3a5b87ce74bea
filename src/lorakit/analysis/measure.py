"""Measure the peak memory of a few real training steps on the CPU, to check the calculator.

Run in a fresh child process (`python -m lorakit.analysis.measure JOBS_JSON`), so that the peak
belongs to these trainings alone. Per job: the RSS high-water mark (VmHWM) is reset through
/proc/self/clear_refs (Linux >= 4.0); the model is built from its config, the method applied,
and `lorakit.train.train` runs a few steps on random tokens. The peak is read in an
optimizer-step post-hook, before the loop's closing work (plotting the loss curve) allocates.

glibc's malloc raises its mmap threshold after large frees and then keeps freed blocks of up to
32 MB in its heap, so RSS can stay far above what is live (a first try measured up to 1.8x the
live peak). `measure` fixes the threshold at 64 KiB (mallopt M_MMAP_THRESHOLD), so every tensor
is mapped on allocation and unmapped on free, and RSS follows the live tensors.
Prints one JSON list: {"peak_mb", "baseline_mb"} per job; peak minus baseline is the training's.
"""
from __future__ import annotations

import ctypes
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.adapters import METHODS, apply
from lorakit.labels import IGNORE_INDEX
from lorakit.train import TrainConfig, train


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def random_batches(vocab: int, batch_size: int, seq_len: int, count: int, seed: int = 0) -> list[dict]:
    """`count` batches of random tokens, every position trained (labels already shifted)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)  # (B, T)
        labels = torch.cat([ids[:, 1:], torch.full((batch_size, 1), IGNORE_INDEX)], dim=1)  # (B, T)
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return batches


M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def fix_mmap_threshold(threshold: int = 64 * 1024) -> None:
    """Serve allocations above `threshold` bytes by mmap, returned to the system on free (glibc)."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)


def measure(job: dict) -> dict:
    """Peak RSS of training `job` = {config, method, batch_size, seq_len, steps, gradient_checkpointing}."""
    torch.set_num_threads(1)
    config = AutoConfig.for_model(**job["config"])
    batches = random_batches(config.vocab_size, job["batch_size"], job["seq_len"], job["steps"])
    options = dict(job["method"])
    method = METHODS[options.pop("name")](**options)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    baseline_kb = _status_kb("VmRSS")
    torch.manual_seed(0)
    model = apply(AutoModelForCausalLM.from_config(config).float(), method)
    peaks: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *args: peaks.append(_status_kb("VmHWM")))
    cfg = TrainConfig(lr=1e-4, max_steps=job["steps"], micro_batch_size=job["batch_size"], progress="none",
                      gradient_checkpointing=job.get("gradient_checkpointing", False), schedule="constant",
                      precision="fp32", compile=False)  # what the calculator's fp32 estimate assumes, on any CPU
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, cfg, train_batches=lambda epoch: batches, run_dir=Path(run_dir))
    handle.remove()
    del model
    gc.collect()
    return {"peak_mb": max(peaks) / 1024, "baseline_mb": baseline_kb / 1024}


if __name__ == "__main__":
    fix_mmap_threshold()
    print(json.dumps([measure(job) for job in json.loads(sys.argv[1])]))
