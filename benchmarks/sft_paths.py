"""The two pipelines under test, each run in its own child process, and how they are measured.

trainer: the tutorial pipeline: datasets.map tokenization, peft.get_peft_model,
         DataCollatorForSeq2Seq (dynamic padding to the longest row of a batch), Trainer.
lorakit: lorakit.data.tokenize_rows + make_batches(pack=True), lorakit.adapters.apply,
         lorakit.train.train.

Both count the same thing: target tokens (positions whose next-token label is not -100), so
padding a pipeline computes on but does not learn from shows up as lost throughput. Steady
state: the first `warmup` optimizer steps are run but not timed.
"""
from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from sft_workload import LORA, PROMPT_TEMPLATE, Size, examples_digest

IGNORE_INDEX = -100


@dataclass
class Job:
    """Everything a pipeline needs; built identically in both child processes."""

    size: Size
    model: Any  # fp32 Llama on the CPU, not yet adapted
    tokenizer: Any
    rows: list[dict[str, str]]
    steps: int  # optimizer steps, warmup included
    warmup: int  # optimizer steps run before the clock starts
    lr: float
    seed: int
    device: str
    precision: str  # fp32 | bf16-autocast | bf16 (lorakit's names)
    lora_dropout: float = LORA["dropout"]
    pack: bool = True  # lorakit only: packed rows (False: one example per row, padded like the Trainer's)
    compile: bool = False  # lorakit only: TrainConfig(compile=True)
    chunked_loss: bool = False  # lorakit only: TrainConfig(chunked_loss=True)
    one_row: bool = False  # lorakit only: one packed row per micro-batch (no row padding), more accumulation
    varlen: bool = True  # lorakit only: per-example attention for packed rows (False: the dense block mask)
    torch_dropout: bool = False  # lorakit only: LoRA dropout through nn.Dropout instead of lorakit's CPU mask
    ranks: int = 1  # lorakit only: this process is one of `ranks` DDP ranks (torch.distributed env set by the caller)
    user_rows: list[dict[str, str]] | None = None  # lorakit-default only: the whole dataset of the user's run


# ----------------------------------------------------------------------------- measuring


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryMeter:
    """Peak memory of the training phase: CUDA allocator peak, or the process's peak RSS (VmHWM).

    On the CPU the RSS high-water mark is reset through /proc/self/clear_refs (Linux >= 4.0) when
    training starts, so the peak excludes imports and model construction.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline_mb = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.baseline_mb = _status_kb("VmRSS") / 1024

    def peak_mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kb("VmHWM") / 1024


def sync(device: str) -> None:
    """Wait for queued device work, so a clock reading covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Wall and process-CPU time at the end of every optimizer step, for any pipeline.

    It is a global optimizer step post-hook, so both pipelines are timed by the same code at the
    same point (right after `optimizer.step()`) without touching either training loop. CPU time
    is robust to other processes competing for the cores (with one thread, it is the compute
    time); wall time is what a user waits.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._handle = None

    def __enter__(self) -> "StepClock":
        self._handle = register_optimizer_step_post_hook(self._tick)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _tick(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        sync(self.device)
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.on_tick is not None:
            self.on_tick()
        if self.stop_after and len(self.wall) >= self.stop_after:
            raise _Enough

    stop_after = 0  # > 0: end the run (raise _Enough) at this many steps
    on_tick: Callable[[], None] | None = None  # also called at every tick


def measured_seconds(ticks: list[float], warmup: int) -> float:
    """Clock time of the measured steps: from the end of the last warmup step to the end of the run."""
    return ticks[-1] - ticks[warmup - 1] if warmup else ticks[-1]


def summarise(job: Job, clock: StepClock, step_tokens: list[int], losses: list[float],
              extra_seconds: float = 0.0) -> dict[str, Any]:
    """Steady-state numbers from the step clock, per-step target tokens and per-step losses.

    `extra_seconds` is work the pipeline did outside its steps that belongs to them (added to
    both clocks, prorated by the caller).
    """
    if len(clock.wall) != job.steps or len(step_tokens) != job.steps or len(losses) != job.steps:
        raise RuntimeError(f"expected {job.steps} optimizer steps, got {len(clock.wall)} clock ticks, "
                           f"{len(step_tokens)} token counts and {len(losses)} losses")
    seconds = measured_seconds(clock.wall, job.warmup) + extra_seconds
    cpu_seconds = measured_seconds(clock.cpu, job.warmup) + extra_seconds
    tokens = sum(step_tokens[job.warmup:])
    measured = job.steps - job.warmup
    return {"steps": job.steps, "measured_steps": measured, "train_seconds": seconds,
            "step_seconds": seconds / measured, "target_tokens": tokens, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu_seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "losses": losses, "first_loss": losses[0], "final_loss": sum(losses[-3:]) / len(losses[-3:])}


# ----------------------------------------------------------------------------- trainer + peft


def tutorial_tokenize(tokenizer: Any) -> Callable[[dict[str, str]], dict[str, list[int]]]:
    """The usual tutorial map function: prompt ids masked with -100, completion + EOS trained."""

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = tokenizer(PROMPT_TEMPLATE.format(prompt=row["prompt"]))["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + answer
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + answer}

    return tokenize


class CountingCollator:
    """Wraps a collator; records per micro-batch the target tokens, real tokens and positions."""

    def __init__(self, inner: Callable[[list[dict]], dict]) -> None:
        self.inner = inner
        self.targets: list[int] = []
        self.real: list[int] = []
        self.positions: list[int] = []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        self.targets.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))  # the model shifts by one
        self.real.append(int(batch["attention_mask"].sum()))
        self.positions.append(batch["input_ids"].numel())
        return batch


def loss_logger(losses: list[float]):
    """A transformers TrainerCallback that appends each logged training loss to `losses`."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
    return LossLog()


def interleaved_rounds(pipelines: list[str], rounds: int, run: Callable[[str], Any]) -> list[list[Any]]:
    """`run(pipeline)` for every pipeline, `rounds` times, the order rotated each round so that no pipeline always
    runs first; each round's results in the order given."""
    done_rounds = []
    n = len(pipelines)
    for index in range(rounds if n else 0):
        done = {}
        for pipeline in [pipelines[(index + k) % n] for k in range(n)]:
            print(f"{pipeline} ...{f' (round {index + 1} of {rounds})' if rounds > 1 else ''}", file=sys.stderr,
                  flush=True)
            done[pipeline] = run(pipeline)
        done_rounds.append([done[pipeline] for pipeline in pipelines])
    return done_rounds


def run_trainer(job: Job, workdir: Path) -> dict[str, Any]:
    """Train with transformers.Trainer + peft, as most tutorials do."""
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    disable_progress_bars()
    started = time.perf_counter()
    dataset = Dataset.from_list(job.rows).map(tutorial_tokenize(job.tokenizer), remove_columns=["prompt", "completion"])
    model = job.model.to(torch.bfloat16) if job.precision == "bf16" else job.model
    model.config.use_cache = False  # the tutorials' "silence the warnings" line
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=job.lora_dropout,
                                             target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    model.to(job.device)
    collator = CountingCollator(DataCollatorForSeq2Seq(job.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
    losses: list[float] = []

    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=job.size.micro_batch,
        gradient_accumulation_steps=job.size.grad_accum, learning_rate=job.lr, max_steps=job.steps,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=job.seed, use_cpu=job.device == "cpu",
        bf16=job.precision != "fp32")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[loss_logger(losses)])
    trainer.remove_callback(PrinterCallback)  # keep the table readable; losses arrive through LossLog
    meter = MemoryMeter(job.device)
    meter.start()
    with StepClock(job.device) as clock:
        trainer.train()
    peak = meter.peak_mb()
    accum = job.size.grad_accum
    step_tokens = [sum(collator.targets[k * accum:(k + 1) * accum]) for k in range(job.steps)]
    result = summarise(job, clock, step_tokens, losses)
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    return {**result, "peak_mb": peak, "baseline_mb": meter.baseline_mb, "peak_delta_mb": peak - meter.baseline_mb,
            "micro_batch_rows": job.size.micro_batch, "grad_accum": accum,
            "step_real_tokens": [sum(collator.real[k * accum:(k + 1) * accum]) for k in range(job.steps)],
            "padding_fraction": 1 - sum(collator.real) / sum(collator.positions),
            "seconds_to_first_step": clock.wall[0] - started, "examples_digest": examples_digest(examples)}


# ----------------------------------------------------------------------------- lorakit


def packed_rows_per_micro_batch(n_rows: int, job: Job, ranks: int = 1) -> int:
    """Rows per micro-batch so that one pass over the packed rows takes about `steps` steps (a step
    takes grad_accum micro-batches on each of `ranks` ranks)."""
    return max(1, round(n_rows / (job.steps * job.size.grad_accum * ranks)))


def run_lorakit(job: Job, workdir: Path) -> dict[str, Any]:
    """Train with lorakit: packed batches, lorakit's LoRA, lorakit's loop."""
    from lorakit.adapters import LoRA, apply
    from lorakit.data import DataConfig, check_packing, make_batches, tokenize_rows
    from lorakit.train import TrainConfig, distributed, read_metrics, train, varlen

    varlen.ENABLED = job.varlen  # this child process only
    started = time.perf_counter()
    data_cfg = DataConfig(format="prompt_completion", prompt_template=PROMPT_TEMPLATE,
                          max_length=job.size.max_length, packing=job.pack)
    examples, _ = tokenize_rows(job.rows, job.tokenizer, data_cfg)
    model = apply(job.model, LoRA(r=LORA["r"], alpha=LORA["alpha"], dropout=job.lora_dropout,
                                  targets=LORA["targets"])).to(job.device)
    if job.torch_dropout:  # the mask torch draws (what peft uses), to measure lorakit's against it
        for module in model.modules():
            if isinstance(getattr(module, "lora_dropout", None), torch.nn.Dropout):
                module.lora_dropout = torch.nn.Dropout(module.lora_dropout.p)
    # several rows per micro-batch are padded to the longest, so long rows pack tighter; a lone row is never padded
    multi_row = job.pack and not job.one_row
    row_length = (job.size.pack_length or job.size.max_length) if multi_row else job.size.max_length
    batch_of = dict(max_length=row_length, pad_id=job.tokenizer.pad_token_id, seed=job.seed, pack=job.pack)
    if job.pack:
        check_packing(model)
        n_rows = len(make_batches(examples, 1, epoch=0, **batch_of))
        rows = 1 if job.one_row else packed_rows_per_micro_batch(n_rows, job, job.ranks)
        accum = max(1, round(n_rows / (job.steps * job.ranks))) if job.one_row else job.size.grad_accum
    else:
        rows, accum = job.size.micro_batch, job.size.grad_accum
    memo: dict[int, list[dict]] = {}
    batching_seconds: list[float] = []

    def train_batches(epoch: int) -> list[dict]:
        if epoch not in memo:
            start = time.perf_counter()
            memo[epoch] = make_batches(examples, rows, epoch=epoch, **batch_of)
            batching_seconds.append(time.perf_counter() - start)
        return memo[epoch]

    cfg = TrainConfig(lr=job.lr, epochs=2, max_steps=job.steps, micro_batch_size=rows,
                      grad_accum=accum, schedule="linear", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, precision=job.precision, seed=job.seed, log_every=1, progress="none",
                      compile=job.compile, chunked_loss=job.chunked_loss)
    meter = MemoryMeter(job.device)
    meter.start()
    with StepClock(job.device) as clock:
        train(model, cfg, train_batches=train_batches, eval_batches=None, run_dir=workdir / "lorakit")
    peak = meter.peak_mb()
    measured_share = (job.steps - job.warmup) / job.steps
    if not distributed.is_main_process():  # only rank 0 writes metrics; the others report their cost
        return {"cpu_seconds": measured_seconds(clock.cpu, job.warmup) + sum(batching_seconds) * measured_share,
                "peak_mb": peak, "baseline_mb": meter.baseline_mb}
    records = read_metrics(workdir / "lorakit" / "metrics.jsonl")
    cumulative = [0] + [r["trained_tokens"] for r in records]
    step_tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
    # the loop builds its batches before the first step; their share for the measured steps is
    # added, so lorakit pays for batching as the Trainer pays for collating inside its steps
    result = summarise(job, clock, step_tokens, [r["loss"] for r in records],
                       extra_seconds=sum(batching_seconds) * measured_share)
    epoch0 = memo[0]
    real = sum(len(ex["input_ids"]) for ex in examples)
    step_real = _step_real_tokens([memo[e] for e in sorted(memo)], job, accum * job.ranks)
    return {**result, "peak_mb": peak, "baseline_mb": meter.baseline_mb, "peak_delta_mb": peak - meter.baseline_mb,
            "micro_batch_rows": rows, "grad_accum": accum, "ranks": job.ranks, "step_real_tokens": step_real,
            "padding_fraction": 1 - real / sum(b["input_ids"].numel() for b in epoch0),
            "batching_seconds": sum(batching_seconds), "seconds_to_first_step": clock.wall[0] - started,
            "examples_digest": examples_digest(examples)}


def _step_real_tokens(epochs: list[Any], job: Job, accum: int) -> list[int]:
    """Per optimizer step of the run, the real (non-pad) tokens it trained on (epochs in order)."""
    lengths = [sum(rows) for batches in epochs for rows in batches.row_lengths()]  # per micro-batch
    return [sum(lengths[k * accum:(k + 1) * accum]) for k in range(job.steps)]


class _Enough(BaseException):
    """Raised from the step clock once the timed steps are done (not an Exception: nothing in the run catches it)."""


def user_config(job: Job, model_dir: Path, data_file: Path, out_dir: Path) -> dict[str, Any]:
    """The config a user writes for this workload: model, data, LoRA recipe, optimizer; no speed settings."""
    return {"model": {"name_or_path": str(model_dir)},
            "data": {"source": str(data_file), "format": "prompt_completion", "prompt_template": PROMPT_TEMPLATE},
            "method": {"name": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": job.lora_dropout,
                       "targets": LORA["targets"]},
            "train": {"lr": job.lr, "epochs": 1, "micro_batch_size": job.size.micro_batch * job.size.grad_accum,
                      "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                      "seed": job.seed, "progress": "none"},
            "output_dir": str(out_dir), "name": "run"}


def run_lorakit_default(job: Job, workdir: Path) -> dict[str, Any]:
    """Train as a user does: the model saved to a folder, the rows to a JSON-lines file, `user_config` through
    `lorakit.finetune` (what `lorakit train CONFIG` runs), every auto setting as it resolves on this machine.

    The run is the user's whole dataset (`job.user_rows`, one epoch: the auto rules see its real length); the
    clock stops it after `job.steps` optimizer steps, the same steps the other pipelines run.
    """
    import json
    import os

    from lorakit.run import finetune
    from lorakit.train import read_metrics

    model_dir, data_file = workdir / "base-model", workdir / "train.jsonl"
    job.model.save_pretrained(model_dir)
    job.tokenizer.save_pretrained(model_dir)
    rows = job.user_rows or job.rows
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.environ["LORAKIT_CACHE_DIR"] = str(workdir / "cache")  # a cold tokenization cache, as on a first run
    lines: list[str] = []
    real, positions, marks = [0], [0], []  # real (non-pad) tokens and positions through the backbone so far; real
    # tokens at every step's end
    pad_id = job.tokenizer.pad_token_id
    backbone = type(job.model.model)
    plain_forward = backbone.forward

    def counting_forward(self, input_ids=None, *args, **kwargs):
        if input_ids is not None:
            real[0] += int((input_ids != pad_id).sum())
            positions[0] += input_ids.numel()
        return plain_forward(self, input_ids, *args, **kwargs)

    meter = MemoryMeter(job.device)
    meter.start()
    started = time.perf_counter()
    backbone.forward = counting_forward  # this child process only
    try:
        with StepClock(job.device) as clock:
            clock.stop_after = job.steps + 1  # the (steps + 1)th step's tick: the first `steps` are recorded
            clock.on_tick = lambda: marks.append(real[0])
            try:
                finetune(user_config(job, model_dir, data_file, workdir / "runs"), log=lines.append)
            except _Enough:
                pass
    finally:
        backbone.forward = plain_forward
    peak = meter.peak_mb()
    records = read_metrics(workdir / "runs" / "run" / "metrics.jsonl")[:job.steps]
    if len(records) < job.steps:
        raise RuntimeError(f"the user's run ended after {len(records)} of {job.steps} steps:\n" + "\n".join(lines))
    clock.wall, clock.cpu = clock.wall[:job.steps], clock.cpu[:job.steps]
    cumulative = [0] + [r["trained_tokens"] for r in records]
    step_tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
    step_real = [b - a for a, b in zip([0] + marks, marks)][:job.steps]
    result = summarise(job, clock, step_tokens, [r["loss"] for r in records])
    choices = [line for line in lines if line.startswith(("precision:", "packing:", "compile:"))]
    first_step = next((line for line in lines if line.startswith("time to first step")), "")
    return {**result, "peak_mb": peak, "baseline_mb": meter.baseline_mb, "peak_delta_mb": peak - meter.baseline_mb,
            "micro_batch_rows": job.size.micro_batch * job.size.grad_accum, "grad_accum": 1,
            "step_real_tokens": step_real, "padding_fraction": 1 - real[0] / max(1, positions[0]), "auto_choices": choices,
            "time_to_first_step_line": first_step, "seconds_to_first_step": clock.wall[0] - started,
            "user_rows": len(rows), "examples_digest": "user-run"}


PIPELINES: dict[str, Callable[[Job, Path], dict[str, Any]]] = {"trainer": run_trainer, "lorakit": run_lorakit,
                                                               "lorakit-default": run_lorakit_default}


def run_pipeline(name: str, job: Job) -> dict[str, Any]:
    """Run one pipeline in a scratch folder; returns its measurements."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as scratch:
        return {"pipeline": name, **PIPELINES[name](job, Path(scratch))}
