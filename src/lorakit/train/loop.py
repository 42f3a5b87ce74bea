"""The one training loop: every method (LoRA, full fine-tuning, ...) and objective (SFT, DPO, ...) trains through `train`.

The loop knows nothing of adapters: it trains whatever parameters have requires_grad=True.
A preference objective (train.objective dpo, ipo, simpo, orpo: train/preference.py) is the same
loop with another loss: its reference is set up here from the model's initial weights, before
any checkpoint is loaded. So is GRPO (train.objective grpo: train/grpo.py), whose objective turns
each step's prompt batches into the completions it samples for them (`Objective.prepare`) before
the step trains on them. It hands each optimizer step's micro-batches and scheduled lr to
`step.train_step` (forward, loss normalised by the step's trained tokens or pairs, backward,
clip, AdamW step; in fp16 with the run's `LossScaler`, whose skipped steps hold the schedule back), wrapped in
out-of-memory halving in a single process and given the `distributed.Parallel` strategy under
torchrun; around the steps it evaluates, logs, checkpoints and resumes. Losses stay on the
device until a logging step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lorakit.adapters.report import trainable_parameters
from lorakit.errors import LorakitError
from lorakit.schema import to_plain
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.auto import resolve_train
from lorakit.train.fastloss import split_head
from lorakit.train.config import AUTO, GRPO, TrainConfig
from lorakit.train.grpo import GRPOObjective, Rollout, check_parallel
from lorakit.train.metrics import (CURVE_FILE, METRICS_FILE, SUMMARY_FILE, MetricsLog, TrainSummary,
                                   plot_loss_curve, write_summary)
from lorakit.train.precision import PRECISIONS, LossScaler
from lorakit.train.preference import AttachedBatches, PreferenceObjective, Precomputed, make_reference, objective_lines
from lorakit.train.progress import Progress, make_progress
from lorakit.train.schedules import lr_factor
from lorakit.train.setup import (build_optimizer, prepared, seed_everything,
                                 trainable_named_parameters)
from lorakit.train.step import (Batch, Halving, StepResult, count_input_tokens, evaluate, halving_on_oom,
                                make_loss_sum, train_step)
from lorakit.train.trackers import Trackers, open_trackers, require_trackers


@dataclass
class LoopState:
    """Where the run stands; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_index: int = 0  # next micro-batch of the current epoch
    halving_parts: int = 1  # pieces per micro-batch after out-of-memory errors
    trained_tokens: int = 0  # cumulative, up to the last metrics record
    input_tokens: int = 0  # cumulative, up to the last metrics record
    elapsed: float = 0.0  # training seconds before this process started
    elapsed_at_record: float = 0.0  # `elapsed` clock at the last metrics record
    pending_loss_sum: float = 0.0  # summed token loss since the last record
    pending_trained: int = 0  # trained tokens since the last record
    pending_units: int | None = None  # units (trained tokens, or pairs) since the last record; None: = pending_trained
    pending_metrics: list[float] = field(default_factory=list)  # a preference objective's metric sums since then
    pending_inputs: int = 0  # input positions since the last record
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    total_steps: int = 0
    batches_per_step: int = 0  # micro-batches of one optimizer step over all ranks (grad_accum x world)
    epoch_batches: list[int] = field(default_factory=list)  # micro-batches of each planned epoch
    precision: str = ""  # the precision the run trains in (train.precision auto, resolved at its start, is kept)


def plan_steps(cfg: TrainConfig, train_batches: Callable[[int], list[Batch]], world: int = 1
               ) -> tuple[int, list[int], list[Batch]]:
    """(total optimizer steps, micro-batches per epoch, epoch 0's batches kept for reuse); a step
    takes grad_accum micro-batches on each of `world` ranks."""
    per_epoch, total, first = [], 0, []
    for epoch in range(cfg.epochs):
        batches = train_batches(epoch)
        if not batches:
            raise LorakitError(f"train_batches({epoch}) returned no batches: the training set is empty")
        first = first or batches
        per_epoch.append(len(batches))
        total += math.ceil(len(batches) / (cfg.grad_accum * world))
        if cfg.max_steps is not None and total >= cfg.max_steps:
            return cfg.max_steps, per_epoch, first
    return total, per_epoch, first


def train(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    train_batches: Callable[[int], list[Batch]],
    eval_batches: list[Batch] | None = None,
    run_dir: Path | str,
    resume: bool | str | Path = False,
    on_checkpoint: Callable[[Path], None] | None = None,
    log: Callable[[str], None] | None = None,
    rollout: Rollout | None = None,
    config: Mapping[str, Any] | None = None,
) -> TrainSummary:
    """Train the parameters of `model` that have requires_grad=True; write metrics, curve, summary.

    train_batches(epoch) returns that epoch's micro-batches (dicts with input_ids, labels already
    shifted with -100 where untrained, attention_mask, ...), deterministic per epoch. `resume` is
    False (fresh run), True (continue from run_dir's latest checkpoint; when the run stopped before its
    first one, start again from step 0 and say so) or a checkpoint path. A resumed run may change its
    length (cfg.epochs, cfg.max_steps; see `_Trainer._check_length`). `on_checkpoint(folder)` is called
    after each checkpoint is complete. Auto precision and compile are resolved from the model and the run's
    plan (train/auto.py); each choice's line goes to `log` (default: print), on the main process. A grpo run
    (cfg.objective grpo) passes prompt batches (data/prompts.py) and the `rollout` they are sampled from.
    The trackers of cfg.report_to (train/trackers.py) get every metrics record, `config` (the run's whole config;
    default: this train section) and the summary.
    """
    require_trackers(cfg.report_to)  # a missing tracker library is one line now, never an error mid-run
    config = dict(config) if config is not None else {"train": to_plain(cfg)}  # as given: auto settings unresolved
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = ckpt.resolve_resume(run_dir, resume)
    if source is None and not resume and ckpt.step_dirs(run_dir / "checkpoints"):
        raise LorakitError(f"{run_dir} already holds checkpoints: pass resume to continue that run, "
                           "or choose a new run folder")
    seed_everything(cfg.seed)
    parallel = distributed.choose(cfg.distributed, model, cfg.dist_timeout_s)  # single unless under torchrun
    total_steps, per_epoch, first_epoch = plan_steps(cfg, train_batches, parallel.world)
    cfg, choices = _resolve_auto(cfg, model, source, total_steps, first_epoch)
    with prepared(model, cfg) as call:
        objective, train_batches, eval_batches, first_epoch, lines = _objective(
            cfg, model, parallel, train_batches, eval_batches, first_epoch, rollout)  # the model's initial weights
        choices += lines
        call = parallel.wrap(model, call)
        trainer = _Trainer(model, call, cfg, train_batches, eval_batches, run_dir, total_steps, on_checkpoint,
                           parallel, objective, config=config)
        trainer.state.epoch_batches = per_epoch
        if parallel.is_main:  # rank 0 speaks for all ranks
            for line in choices:
                (log or print)(line)
        try:
            if source is not None:
                trainer.load(source)
            elif resume:
                trainer.notes.append(f"resume: {run_dir} holds no complete checkpoint (the run stopped before its "
                                     "first one was written): training starts again from step 0")
            trainer.run(per_epoch, first_epoch)
        except RuntimeError as error:
            if parallel.world == 1:
                raise
            raise distributed.lost_rank_error(parallel, error, run_dir) from error
        else:
            return trainer.finish(source)
        finally:
            trainer.trackers.close()  # a run that stopped early marks its tracker runs failed


def _objective(cfg: TrainConfig, model: nn.Module, parallel: distributed.Parallel,
               train_batches: Callable[[int], list[Batch]], eval_batches: list[Batch] | None, first_epoch: list[Batch],
               rollout: Rollout | None = None):
    """A preference or grpo objective with its reference taken from the model as it is now (before a checkpoint is
    loaded), the batches with precomputed reference log-probs attached when train.reference is precomputed, and the
    lines the run prints; for sft (None, the batches as given, no lines)."""
    if not cfg.preference and cfg.objective != GRPO:
        return None, train_batches, eval_batches, first_epoch, []
    if cfg.objective == GRPO:
        check_parallel(parallel)
        if rollout is None:
            raise LorakitError("train.objective grpo samples from prompts and scores with rewards: pass the "
                               "rollout (lorakit train and lorakit.finetune build it from the config)")
    device = next(model.parameters()).device
    # the policy's pass takes the head at trained positions only where the chunked loss would (not through DDP's
    # wrapper); the reference does as the policy, so both run the same arithmetic
    fast = cfg.chunked_loss and parallel.kind != "ddp" and split_head(model) is not None
    reference = make_reference(cfg, model, lambda: [*first_epoch, *(eval_batches or [])], device,
                               PRECISIONS[cfg.precision], parallel.rank, parallel.world, sharded=parallel.kind == "fsdp",
                               fast=fast)
    if cfg.objective == GRPO:
        objective = GRPOObjective(cfg, model, rollout, reference, PRECISIONS[cfg.precision], parallel)
        return objective, train_batches, eval_batches, first_epoch, objective.describe()
    if isinstance(reference, Precomputed):
        given = train_batches
        train_batches = lambda epoch: AttachedBatches(given(epoch), reference)  # noqa: E731
        eval_batches = AttachedBatches(eval_batches, reference) if eval_batches else eval_batches
        first_epoch = AttachedBatches(first_epoch, reference)
    lines = objective_lines(cfg, reference, fast)
    return PreferenceObjective(cfg, reference), train_batches, eval_batches, first_epoch, lines


def _resolve_auto(cfg: TrainConfig, model: nn.Module, source: Path | None, total_steps: int,
                  first_epoch: list[Batch]) -> tuple[TrainConfig, list[str]]:
    """`cfg` with auto precision and compile resolved for this run (the rules: train/auto.py), and their lines.

    Compile weighs the steps still to run, each of grad_accum micro-batches the size of epoch 0's average
    (positions, padding included, as the model computes them); a resumed run keeps the precision it started with.
    """
    lines = []
    if cfg.objective == GRPO and cfg.compile == AUTO:  # decoding passes of every length would recompile the layers
        cfg, lines = dataclasses.replace(cfg, compile=False), ["compile: off (objective grpo: its sampling passes "
                                                              "run uncompiled)"]
    if cfg.precision != AUTO and cfg.compile != AUTO:
        return cfg, lines
    saved = json.loads((source / "state.json").read_text())["loop"] if source is not None else {}
    positions = [len(rows) * max(rows) for rows in first_epoch.row_lengths()] if hasattr(
        first_epoch, "row_lengths") else [batch["input_ids"].numel() for batch in first_epoch]
    tokens_per_step = cfg.grad_accum * sum(positions) / max(1, len(positions))
    cfg, resolved = resolve_train(cfg, model, steps=total_steps - saved.get("step", 0),
                                  tokens_per_step=tokens_per_step, kept_precision=saved.get("precision") or None)
    return cfg, lines + resolved


class _Trainer:
    """One process's share of a run: the state, the optimizer and the files it writes."""

    def __init__(self, model: nn.Module, call: nn.Module, cfg: TrainConfig,
                 train_batches: Callable[[int], list[Batch]], eval_batches: list[Batch] | None,
                 run_dir: Path, total_steps: int, on_checkpoint: Callable[[Path], None] | None,
                 parallel: distributed.Parallel | None = None,
                 objective: PreferenceObjective | GRPOObjective | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.model, self.cfg, self.run_dir = model, cfg, run_dir
        self.config = dict(config or {})  # the run's config, as the trackers record it
        self.parallel = parallel or distributed.Parallel()
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.on_checkpoint = on_checkpoint
        self.named = trainable_named_parameters(model)
        self.names = {id(p): name for name, p in self.named}
        self.params = [p for _, p in self.named]
        self.optimizer = build_optimizer(self.named, cfg)
        device = self.params[0].device
        self.model_loss = make_loss_sum(call, device, PRECISIONS[cfg.precision], chunked=cfg.chunked_loss,
                                        objective=objective)
        self.scaler = LossScaler() if PRECISIONS[cfg.precision].scales_loss else None  # fp16's dynamic loss scale
        self.objective = objective
        self.state = LoopState(total_steps=total_steps, batches_per_step=cfg.grad_accum * self.parallel.world,
                               precision=cfg.precision)
        # ranks must agree on every split, so out-of-memory halving is a single-process feature
        self.halving = Halving(enabled=cfg.auto_batch_halving and self.parallel.world == 1)
        self.warmup = cfg.resolve_warmup(total_steps)
        self.pending_loss = torch.zeros((), device=device)
        self.pending_trained = torch.zeros((), dtype=torch.long)
        self.pending_units = torch.zeros((), dtype=torch.long)
        self.eval_metrics: dict[str, float] = {}  # a preference objective's metrics of the last evaluation
        self.grad_norm: torch.Tensor | None = None
        self.started = time.perf_counter()
        self.metrics: MetricsLog | None = None
        self.trackers = Trackers()  # opened with the metrics file (`run`), on rank 0 only
        self.progress: Progress | None = None
        self.notes: list[str] = []  # shown once the progress display exists
        self.checkpointed = False  # whether this run has a checkpoint (written, or resumed from)
        self.last_save = self.started  # clock of the last checkpoint (time-based checkpoints count from it)
        self.save_interval_s = cfg.save_every_minutes * 60.0

    # ---- resume ------------------------------------------------------------------------
    def load(self, folder: Path) -> None:
        """Continue from checkpoint `folder`: weights, optimizer, RNG, data position, counters."""
        saved = ckpt.read_checkpoint(folder)
        state = LoopState(**saved.state["loop"])
        self._check_length(state, folder)
        self.parallel.load(self.model, self.optimizer, self.names, saved, folder)
        ckpt.restore_rng(saved.state["rng"], saved.rng_tensors)
        state.total_steps, state.epoch_batches = self.state.total_steps, self.state.epoch_batches
        state.batches_per_step, state.precision = self.state.batches_per_step, self.cfg.precision
        self.state, self.checkpointed = state, True
        self.halving.parts = self.state.halving_parts
        self.pending_loss.fill_(self.state.pending_loss_sum if self.parallel.is_main else 0.0)  # summed on rank 0
        self.pending_trained.fill_(self.state.pending_trained)
        units = self.state.pending_units
        self.pending_units.fill_(self.state.pending_trained if units is None else units)
        if self.objective is not None:
            self.objective.restore(self.state.pending_metrics if self.parallel.is_main else [])
        if self.scaler is not None and "scaler" in saved.state:
            self.scaler.load_state_dict(saved.state["scaler"])

    def _check_length(self, saved: LoopState, folder: Path) -> None:
        """A resumed run may change its length (epochs, max_steps), not its steps: the same micro-batches per
        step and per epoch. The learning-rate schedule is then that of a run planned with the new length from
        the start (schedules are functions of step and total), followed from the resumed step on."""
        old, new, step = saved.total_steps, self.state.total_steps, saved.step
        if old == new:
            return
        if not saved.epoch_batches:
            raise LorakitError(f"resume: {folder} belongs to a run of {old} steps, this config plans {new}; a "
                               "checkpoint written before lorakit recorded a run's plan resumes with its own length")
        shared = min(len(saved.epoch_batches), len(self.state.epoch_batches))
        if (saved.batches_per_step != self.state.batches_per_step
                or saved.epoch_batches[:shared] != self.state.epoch_batches[:shared]):
            raise LorakitError(f"resume: {folder} belongs to a run of {old} steps, this config plans {new}, and "
                               "its steps differ (grad_accum, micro_batch_size or the data changed); only "
                               "epochs and max_steps may change")
        if step > new:
            raise LorakitError(f"resume: {folder} is at step {step}, past the {new} steps this config plans "
                               f"(epochs {self.cfg.epochs}, max_steps {self.cfg.max_steps})")
        schedule = self.cfg.schedule
        before = lr_factor(step, old, self.cfg.resolve_warmup(old), schedule) * self.cfg.lr
        after = lr_factor(step, new, self.warmup, schedule) * self.cfg.lr
        self.notes.append(f"resume: the run's length changes from {old} to {new} steps; from step {step + 1} on it "
                          f"follows the {schedule} schedule of a {new}-step run (lr {before:.3g} -> {after:.3g})")

    # ---- the loop ------------------------------------------------------------------------
    def run(self, per_epoch: list[int], first_epoch: list[Batch]) -> None:
        """Train from the current state to the last step (`first_epoch`: epoch 0's batches, if known)."""
        resume_step = self.state.step if self.state.step else None
        main = self.parallel.is_main  # only rank 0 writes and shows progress
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, resume_step=resume_step) if main else \
            distributed.MemoryLog()
        self.trackers = open_trackers(self.cfg.report_to, self.run_dir, self.config, resume_step=resume_step,
                                      main=main)
        self.progress = make_progress(self.cfg.progress if main else "none", self.state.total_steps, self.state.step)
        for note in self.notes:
            self.progress.message(note)
        try:
            while self.state.step < self.state.total_steps:
                epoch = self.state.epoch
                batches = first_epoch if epoch == 0 and first_epoch else self.train_batches(epoch)
                first_epoch = []
                if len(batches) != per_epoch[epoch]:
                    raise LorakitError(f"train_batches({epoch}) returned {len(batches)} batches, "
                                       f"{per_epoch[epoch]} when counted: it must be deterministic")
                self._run_epoch(batches)
        finally:
            self.progress.close()

    def _run_epoch(self, batches: list[Batch]) -> None:
        state, accum = self.state, self.cfg.grad_accum * self.parallel.world
        while state.batch_index < len(batches) and state.step < state.total_steps:
            group = batches[state.batch_index: state.batch_index + accum]
            lr = self._optimizer_step(group)
            state.batch_index += len(group)
            state.step += 1
            self.progress.advance(state.step)
            self._after_step(lr, epoch=state.epoch + state.batch_index / len(batches))
        if state.batch_index >= len(batches):
            state.epoch, state.batch_index = state.epoch + 1, 0

    def _optimizer_step(self, group: list[Batch]) -> float:
        """One optimizer step over the micro-batches `group` (all ranks' share); returns the lr used."""
        skipped = self.scaler.skipped if self.scaler is not None else 0  # skipped fp16 steps hold the schedule back
        lr = self.cfg.lr * lr_factor(self.state.step - skipped, self.state.total_steps, self.warmup, self.cfg.schedule)

        def step(micro_batches: list[Batch]) -> StepResult:
            return train_step(self.model_loss, micro_batches, self.optimizer, params=self.params, lr=lr,
                              max_grad_norm=self.cfg.max_grad_norm, parallel=self.parallel, scaler=self.scaler)

        share = self.parallel.share(group)
        micro_batches = self.objective.prepare(share, self.state.step) if self.objective is not None else share
        # ranks must agree on every split, so out-of-memory halving wraps single-process steps only
        done = halving_on_oom(step, micro_batches, self.halving, self._on_split) if self.parallel.world == 1 \
            else step(micro_batches)
        self.grad_norm = done.grad_norm
        self.pending_loss += done.loss_sum.float()
        count = done.trained_tokens
        self.pending_trained = self.pending_trained.to(count.device) + count  # stays where labels live
        self.pending_units = self.pending_units.to(done.units.device) + done.units
        inputs = count_input_tokens(group)  # every rank's positions, read from shapes
        if micro_batches is not share:  # made in this step (GRPO's samples): counted on each rank, then summed
            made = torch.tensor(count_input_tokens(micro_batches), device=self.pending_loss.device)
            inputs = int(self.parallel.total(made))
        self.state.pending_inputs += inputs
        return lr

    def _on_split(self, max_rows: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        parts = self.halving.parts
        self.state.halving_parts = parts
        self.progress.message(
            f"out of memory on micro-batches of up to {max_rows} rows: splitting each micro-batch into {parts} "
            f"pieces, {self.cfg.grad_accum * parts} passes per step (same effective batch and loss normalisation)")

    def _after_step(self, lr: float, epoch: float) -> None:
        step, last = self.state.step, self.state.step == self.state.total_steps
        eval_loss = None
        if self.eval_batches and (last or (self.cfg.eval_every and step % self.cfg.eval_every == 0)):
            eval_loss = self._evaluate()
        if last or eval_loss is not None or step % self.cfg.log_every == 0:
            self._record(lr, epoch, eval_loss)
        if self._checkpoint_due(last):
            self._save()

    def _evaluate(self) -> float:
        self.model.eval()
        try:
            loss = evaluate(self.model_loss, self.eval_batches, self.halving, self._on_split)
        finally:
            self.model.train()
        state = self.state
        sums = self.objective.take(evaluation=True) if self.objective is not None else None
        if sums is not None:  # every rank evaluates every batch: its own sums are the totals
            self.eval_metrics = self.objective.means(sums, prefix="eval_")
        if state.best_eval_loss is None or loss < state.best_eval_loss:
            state.best_eval_loss, state.best_eval_step = loss, state.step
        reward = (self.eval_metrics or {}).get("eval_reward") if sums is not None else None
        self.progress.message(f"step {state.step}: eval loss {loss:.4f}" if reward is None else
                              f"step {state.step}: eval reward {float(reward):.4f} (eval loss = minus it)")
        return loss

    def _elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self.started

    def _record(self, lr: float, epoch: float, eval_loss: float | None) -> None:
        """Sync the pending loss from the device and append one metrics line."""
        state, now = self.state, self._elapsed()
        self.parallel.collect(self.pending_loss)
        trained = int(self.pending_trained.item())
        loss = self.pending_loss.item() / max(1, int(self.pending_units.item()))  # per trained token, or per pair
        state.trained_tokens += trained
        state.input_tokens += state.pending_inputs
        tokens_per_s = state.pending_inputs / max(1e-9, now - state.elapsed_at_record)
        record = {"step": state.step, "epoch": round(epoch, 6), "loss": loss, "lr": lr,
                  "grad_norm": None if self.grad_norm is None else float(self.grad_norm.item()),
                  "tokens_per_s": tokens_per_s, "trained_tokens": state.trained_tokens, "elapsed": now}
        if eval_loss is not None:
            record["eval_loss"] = eval_loss
        if self.scaler is not None:  # fp16: the loss scale now, and the steps skipped for overflowing gradients so far
            record["loss_scale"], record["skipped_steps"] = self.scaler.scale, self.scaler.skipped
        auxiliary = self.model_loss.auxiliary.take()  # e.g. MoLE load balancing; None for most methods
        if auxiliary is not None:
            self.parallel.collect(auxiliary)
            record["aux_loss"] = auxiliary.item() / max(1, int(self.pending_units.item()))  # weighted, per unit
        self._preference_record(record, eval_loss is not None, now - state.elapsed_at_record)
        self.metrics.write(record)
        self.trackers.log(record)
        self.progress.report(state.step, loss, tokens_per_s, lr)
        self.pending_loss.zero_()
        self.pending_trained.zero_()
        self.pending_units.zero_()
        state.pending_inputs, state.elapsed_at_record = 0, now

    def _preference_record(self, record: dict, evaluated: bool, seconds: float) -> None:
        """An objective's metrics since the last record, which was `seconds` ago (a preference objective's means per
        pair; grpo's rewards, KL, clipping, lengths and speeds), and of this step's evaluation, added to `record`
        and to the progress line."""
        sums = self.objective.take() if self.objective is not None else None
        if sums is None:
            return
        self.parallel.collect(sums)  # summed on rank 0, which alone writes
        record.update(self.objective.means(sums, seconds=seconds))
        if evaluated:
            record.update(self.eval_metrics)
        self.progress.extra = self.objective.progress_text(record)

    # ---- checkpoints -----------------------------------------------------------------------
    def _checkpoint_due(self, last: bool) -> bool:
        """Every save_every steps; after the last step when the run has a checkpoint (so it can be extended
        from its end; a run without one writes its outputs next); and every save_every_minutes."""
        cfg, step = self.cfg, self.state.step
        if cfg.save_every and step % cfg.save_every == 0:
            return True
        if last or not cfg.save_every_minutes:
            return last and self.checkpointed
        if self.parallel.world == 1:
            return time.perf_counter() - self.last_save >= self.save_interval_s
        if step % cfg.log_every:  # ranks agree on rank 0's clock, at logging steps (the host syncs there anyway)
            return False
        due = self.parallel.is_main and time.perf_counter() - self.last_save >= self.save_interval_s
        return bool(self.parallel.total(torch.tensor(float(due), device=self.pending_loss.device)).item())

    def _save(self) -> None:
        started = time.perf_counter()
        state = self.state
        self.parallel.collect(self.pending_loss)
        state.pending_loss_sum = float(self.pending_loss.item())
        state.pending_trained = int(self.pending_trained.item())
        state.pending_units = int(self.pending_units.item())
        if self.objective is not None:  # the metric sums of the logging interval, summed on rank 0 as the loss
            sums = self.objective.take()
            if sums is not None:
                self.parallel.collect(sums)
            state.pending_metrics = sums.tolist() if sums is not None else []
            self.objective.restore(state.pending_metrics)
        state.halving_parts = self.halving.parts
        saved_elapsed, state.elapsed = state.elapsed, self._elapsed()
        rng_meta, rng_tensors = ckpt.capture_rng()
        optimizer_tensors, optimizer_meta = self.parallel.optimizer_state(self.model, self.optimizer, self.names)
        checkpoint = ckpt.Checkpoint(
            weights=self.parallel.trainable_state(self.model), optimizer_tensors=optimizer_tensors,
            optimizer_meta=optimizer_meta, rng_tensors=rng_tensors,
            state={"format": 1, "loop": asdict(state), "rng": rng_meta,
                   **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})})
        state.elapsed = saved_elapsed
        folder = self.run_dir / "checkpoints" / f"step-{state.step}"
        if self.parallel.is_main:
            folder = ckpt.write_checkpoint(folder.parent, state.step, checkpoint, keep=self.cfg.keep_checkpoints)
            self.progress.message(f"step {state.step}: checkpoint {folder}")
        self.parallel.barrier()  # no rank runs ahead of a checkpoint being written
        self.checkpointed, self.last_save = True, time.perf_counter()
        # writing stays under 5% of the time: a slow disk or a large model stretches the time-based interval
        self.save_interval_s = max(self.cfg.save_every_minutes * 60.0, 20 * (self.last_save - started))
        if self.on_checkpoint is not None:
            self.on_checkpoint(folder)

    # ---- the end ---------------------------------------------------------------------------
    def finish(self, source: Path | None) -> TrainSummary:
        """Write loss_curve.png and summary.json; return the summary."""
        state, wall = self.state, self._elapsed()
        records = self.metrics.records
        if self.parallel.is_main:
            plot_loss_curve(records, self.run_dir / CURVE_FILE)
        trainable, total = trainable_parameters(self.model)
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        summary = TrainSummary(
            steps=state.step, epochs=records[-1]["epoch"] if records else 0.0,
            trainable_params=trainable, total_params=total, wall_time_s=wall,
            tokens_per_s=state.input_tokens / max(1e-9, wall), trained_tokens=state.trained_tokens,
            final_loss=records[-1]["loss"] if records else None,
            final_eval_loss=evals[-1] if evals else None,
            best_eval_loss=state.best_eval_loss, best_eval_step=state.best_eval_step,
            micro_batch_parts=self.halving.parts, resumed_from=str(source) if source else None)
        if self.parallel.is_main:
            write_summary(summary, self.run_dir / SUMMARY_FILE)
        self.trackers.finish(summary.to_dict())
        return summary
