"""What train_speed.py adds to the SFT harness: TRL's SFTTrainer, model FLOPs and the bf16 matmul roofline.

trl:      trl.SFTTrainer on the same prompt/completion rows (completion-only loss), with its
          best-fit packing (padding-free rows, position_ids restarting per example) into rows of
          the size's pack_length, peft LoRA with the same recipe, the same steps and schedule.
Roofline: the rate of a bf16 matmul of the model's own shapes, measured in the same process
          with the same threads, as FLOPs per second of process CPU time (and of wall time).
FLOPs:    model FLOPs per real token: 2 per weight in the forward pass, 2 more per weight for the
          input gradients, 2 more per *trainable* weight for its gradient (so ~4N for LoRA, 6N for
          full fine-tuning), plus causal attention within each example (QK^T and PV, forward and
          backward: 12 * layers * width * mean context).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sft_paths import (IGNORE_INDEX, Job, MemoryMeter, StepClock, loss_logger, packed_rows_per_micro_batch,
                       summarise, tutorial_tokenize)
from sft_workload import LORA, PROMPT_TEMPLATE, examples_digest


def run_trl(job: Job, workdir: Path) -> dict[str, Any]:
    """Train with trl.SFTTrainer: prompt/completion rows, BFD packing (padding-free), peft LoRA."""
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "completion": r["completion"]} for r in job.rows]
    pack_length = job.size.pack_length or job.size.max_length
    examples = [tutorial_tokenize(job.tokenizer)(r) for r in job.rows]
    n_packed = len(_bfd_rows([len(e["input_ids"]) for e in examples], pack_length))
    rows_per_micro = packed_rows_per_micro_batch(n_packed, job)
    model = job.model.to(torch.bfloat16) if job.precision == "bf16" else job.model
    model.config.use_cache = False
    losses: list[float] = []
    seen: list[dict[str, int]] = []

    args = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=rows_per_micro,
        gradient_accumulation_steps=job.size.grad_accum, learning_rate=job.lr, max_steps=job.steps,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=job.seed, use_cpu=job.device == "cpu",
        bf16=job.precision != "fp32", packing=True, max_length=pack_length, completion_only_loss=True,
        dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=job.tokenizer,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=job.lora_dropout,
                                                target_modules=LORA["targets"], task_type="CAUSAL_LM"),
                         callbacks=[loss_logger(losses)])
    trainer.remove_callback(PrinterCallback)
    collate = trainer.data_collator

    def counting_collator(features: list[dict]) -> dict:
        batch = collate(features)
        labels = batch["labels"]
        seen.append({"targets": int((labels[:, 1:] != IGNORE_INDEX).sum()), "positions": labels.numel(),
                     "real": sum(len(f["input_ids"]) for f in features)})
        return batch

    trainer.data_collator = counting_collator
    meter = MemoryMeter(job.device)
    meter.start()
    with StepClock(job.device) as clock:
        trainer.train()
    peak = meter.peak_mb()
    accum = job.size.grad_accum
    per_step = [seen[k * accum:(k + 1) * accum] for k in range(job.steps)]
    step_tokens = [sum(s["targets"] for s in step) for step in per_step]
    result = summarise(job, clock, step_tokens, losses)
    return {**result, "peak_mb": peak, "baseline_mb": meter.baseline_mb, "peak_delta_mb": peak - meter.baseline_mb,
            "micro_batch_rows": rows_per_micro, "grad_accum": accum,
            "step_real_tokens": [sum(s["real"] for s in step) for step in per_step],
            "padding_fraction": 1 - sum(s["real"] for s in seen) / sum(s["positions"] for s in seen),
            "examples_digest": examples_digest(examples)}


def _bfd_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins (what TRL's 'bfd' strategy builds), only to size its batches."""
    bins: list[list[int]] = []
    space: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [k for k, s in enumerate(space) if s >= n]
        k = min(fits, key=lambda j: space[j]) if fits else None
        if k is None:
            bins.append([n])
            space.append(capacity - n)
        else:
            bins[k].append(n)
            space[k] -= n
    return bins


# ----------------------------------------------------------------------------- FLOPs


def model_flops_per_token(model: Any, targets: list[str], r: int, mean_context: float) -> float:
    """Model FLOPs of one real token in LoRA training, from the base model (before adapters).

    4 per frozen matmul weight (forward + input gradient; a tied lm_head counts once as a matmul,
    the embedding lookup costs nothing), 6 per LoRA weight (r * (d_in + d_out) per targeted
    projection, trainable), plus causal attention within each example.
    """
    frozen = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            frozen += module.weight.numel()
            if name.rsplit(".", 1)[-1] in targets:
                lora += r * (module.in_features + module.out_features)
    config = model.config
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 12 * config.num_hidden_layers * width * mean_context
    return 4 * frozen + 6 * lora + attention


def mean_causal_context(lengths: list[int]) -> float:
    """Mean number of earlier-or-same positions a token attends to, within its own example."""
    return sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))


def bf16_matmul_rate(hidden: int, intermediate: int, tokens: int = 2048, seconds: float = 2.0,
                     windows: int = 8) -> dict[str, float]:
    """Peak FLOP rate of bf16 matmuls shaped like the model's MLP (tokens x hidden @ hidden x intermediate).

    Both the forward and backward shapes of one projection are timed, in `windows` windows of
    `seconds / windows` each. The best window is the rate reported (a roofline is a peak; on a
    shared or throttled machine single windows vary by 2x), per second of wall time and per
    second of process CPU time; the median window is kept alongside.
    """
    a = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    w = torch.randn(intermediate, hidden, dtype=torch.bfloat16)
    g = torch.randn(tokens, intermediate, dtype=torch.bfloat16)
    flops_per_round = 2 * 2 * tokens * hidden * intermediate  # y = a w^T and dx = g w
    for _ in range(3):  # warm up the kernels
        a @ w.T, g @ w
    wall_rates, cpu_rates = [], []
    for _ in range(windows):
        rounds, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall0 < seconds / windows:
            a @ w.T
            g @ w
            rounds += 1
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        wall_rates.append(rounds * flops_per_round / wall)
        cpu_rates.append(rounds * flops_per_round / max(cpu, 1e-9))
    return {"flops_per_s": max(wall_rates), "flops_per_cpu_s": max(cpu_rates),
            "median_flops_per_s": statistics.median(wall_rates),
            "median_flops_per_cpu_s": statistics.median(cpu_rates),
            "threads": torch.get_num_threads(), "windows": windows}


def best_rate(samples: list[dict[str, float]]) -> dict[str, Any]:
    """The highest of several bf16_matmul_rate measurements (e.g. before and after the runs), all kept."""
    best = max(samples, key=lambda s: s["flops_per_cpu_s"])
    return {**best, "samples": samples}
