"""Training under torch.distributed (torchrun): DDP for adapters, FSDP2 for full fine-tuning.

Launch with `torchrun --nproc-per-node N -m lorakit train CONFIG` (or `lorakit train --nproc N`).
Every rank builds the same global list of micro-batches per epoch (same seed, same epoch) and
one optimizer step consumes `grad_accum x world` of them: rank r takes every world-th one of the
step's group, starting at r (`Parallel.share`). The strategy object is passed to the one training
step, `step.train_step`, and parameterises it: `total` sums the step's trained tokens over all
ranks once, before any backward pass, and the step divides by `world` too, so that DDP's (and
FSDP's) gradient averaging yields exactly the gradient of the single-process run with `grad_accum
x world` micro-batches; `gradient_sync` lets gradients synchronise on a rank's last micro-batch only.

Only rank 0 writes files; checkpoints hold full (gathered) tensors by parameter name, the same
files a single process writes, so a run can resume with any number of ranks.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lorakit.errors import LorakitError
from lorakit.labels import IGNORE_INDEX
from lorakit.train import checkpoint as ckpt
from lorakit.train.setup import decoder_layers

if TYPE_CHECKING:  # step.py imports this module: its Batch type is for annotations only
    from lorakit.train.step import Batch


def init_from_env(timeout_s: float) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when distributed.

    nccl on GPU (each rank on cuda:LOCAL_RANK), gloo on CPU; `timeout_s` bounds every collective,
    so a rank that dies makes the others fail instead of waiting forever.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (if any) cleanly.

    Called from a `finally`: when no exception is in flight, every rank first waits for the others
    (a barrier, bounded by the group's timeout), so no rank tears down its gloo threads while a
    peer still talks to it (seen as a rare SIGABRT at exit, "terminate called without an active
    exception"); after an error, e.g. a lost rank, it leaves at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sys.exc_info()[0] is None:
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone after all: leave anyway
            pass
    dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0, and in any single-process run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def silent_copy(batch: Batch) -> Batch:
    """`batch` with every label ignored: a rank short of micro-batches in a step runs it so that it
    still joins the collectives, contributing zero loss and zero gradient."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


class Parallel:
    """A single process: the no-op strategy the loop uses when torch.distributed is not running."""

    kind = "single"

    def __init__(self) -> None:
        self.rank, self.world = 0, 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files and shows progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module, call: nn.Module) -> nn.Module:
        """The callable that runs forward passes (wrapped for DDP, sharded in place for FSDP)."""
        return call

    def share(self, group: list[Batch]) -> list[Batch]:
        """This rank's micro-batches of one optimizer step's global `group`."""
        if self.world == 1:
            return group
        mine = group[self.rank::self.world]
        # every rank runs the same number of passes: FSDP all-gathers in each one
        return mine + [silent_copy(group[0])] * (-(-len(group) // self.world) - len(mine))

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all ranks."""
        return value

    def collect(self, value: torch.Tensor) -> None:
        """In place: the sum over ranks on rank 0, zero elsewhere (running sums then stay additive)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward: gradients synchronise over the ranks
        only when `last` (the rank's last micro-batch of the step)."""
        return contextlib.nullcontext()

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full trainable weights by name (collective; complete on rank 0)."""
        return ckpt.trainable_state(model)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        names: dict[int, str]) -> tuple[dict, dict]:
        """(tensors, meta) of the optimizer in checkpoint format (collective; complete on rank 0)."""
        return ckpt.optimizer_state(optimizer, names)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str],
             saved: ckpt.Checkpoint, folder: Path) -> None:
        """Put a checkpoint's weights and optimizer state into this rank's model and optimizer."""
        ckpt.load_trainable_state(model, saved.weights, folder)
        ckpt.load_optimizer_state(optimizer, names, saved.optimizer_tensors, saved.optimizer_meta, folder)


class _Collective(Parallel):
    """What DDP and FSDP share: rank, world and sums over the ranks."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def collect(self, value: torch.Tensor) -> None:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        if not self.is_main:
            value.zero_()

    def barrier(self) -> None:
        dist.barrier()


class DDP(_Collective):
    """DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

    kind = "ddp"

    def wrap(self, model: nn.Module, call: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        self.ddp = nn.parallel.DistributedDataParallel(
            call, device_ids=[device] if device.type == "cuda" else None)
        return self.ddp

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


class FSDP(_Collective):
    """FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks."""

    kind = "fsdp"

    def wrap(self, model: nn.Module, call: nn.Module) -> nn.Module:
        for block in decoder_layers(model) or []:
            fully_shard(block)  # one all-gather per block, freed after its forward
        # the root too: after an evaluation forward (no backward to follow) no weights stay gathered
        self.root = fully_shard(model, reshard_after_forward=True)
        return call

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _options(self, **extra: bool):
        return StateDictOptions(full_state_dict=True, **extra)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = get_model_state_dict(model, options=self._options(cpu_offload=True, ignore_frozen_params=True))
        return {name: value.contiguous() for name, value in state.items() if name in trainable}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        names: dict[int, str]) -> tuple[dict, dict]:
        state = get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))
        if not state:
            return {}, {}
        tensors, scalars = {}, {}
        for name, entries in state["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"{name}/{key}"] = value.contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
        return tensors, {"param_groups": state["param_groups"], "scalars": scalars}

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str],
             saved: ckpt.Checkpoint, folder: Path) -> None:
        ckpt._check_same_names(set(names.values()), set(saved.weights), folder)
        set_model_state_dict(model, saved.weights, options=self._options(strict=False))
        state: dict[str, dict] = {}
        for key, value in saved.optimizer_tensors.items():
            name, _, entry = key.rpartition("/")
            state.setdefault(name, {})[entry] = value
        for name, entries in saved.optimizer_meta["scalars"].items():
            state.setdefault(name, {}).update(entries)
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in saved.optimizer_meta["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=self._options())


class MemoryLog:
    """What ranks other than 0 keep instead of metrics.jsonl: the records, in memory only."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        """Keep one record."""
        self.records.append(record)


STRATEGIES: dict[str, type[Parallel]] = {"ddp": DDP, "fsdp": FSDP}  # TrainConfig.distributed names these
MODES = ("auto", *STRATEGIES)


def choose(mode: str, model: nn.Module, timeout_s: float) -> Parallel:
    """The strategy for this process: single when not distributed; else `mode` ('auto': FSDP when
    every parameter trains, i.e. full fine-tuning, DDP for adapters)."""
    if not init_from_env(timeout_s):
        return Parallel()
    if mode == "auto":
        mode = "fsdp" if all(p.requires_grad for p in model.parameters()) else "ddp"
    if mode not in STRATEGIES:
        raise LorakitError(f"train.distributed: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return STRATEGIES[mode]()


def start(cfg, *, full_fine_tuning: bool) -> bool:
    """Join torchrun's process group (if any) before the model loads, so each rank picks its own
    GPU; True on the rank that writes files. FSDP2 from the CLI is for method full: the final
    save gathers a whole model (adapter folders are saved from unsharded models, DDP)."""
    if not init_from_env(cfg.dist_timeout_s):
        return True
    if cfg.distributed == "fsdp" and not full_fine_tuning:
        raise LorakitError("train.distributed: fsdp from `lorakit train` needs method full; use ddp (or auto) "
                           "for adapter methods")
    return dist.get_rank() == 0


def gathered_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict gathered from FSDP2 shards (collective; on rank 0), or None when the
    model is not sharded."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def lost_rank_error(parallel: Parallel, error: BaseException, run_dir: Path) -> LorakitError:
    """The message a rank ends with when a collective fails (another rank died or timed out)."""
    latest = ckpt.read_pointer(run_dir / "checkpoints")
    where = f"the last complete checkpoint is {latest}; continue with --resume" if latest else "no checkpoint yet"
    return LorakitError(f"rank {parallel.rank} of {parallel.world}: a collective failed, another rank probably "
                        f"died or hung ({type(error).__name__}: {str(error).splitlines()[0][:200]}); {where}")
