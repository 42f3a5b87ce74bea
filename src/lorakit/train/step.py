"""One optimizer step, written once for every method and objective: `train_step`, readable top to bottom.

For each micro-batch: move it to the device, run the forward pass under the precision's
autocast, sum the loss over the batch's units (the token cross-entropy over trained positions for
SFT; the per-pair loss for a preference objective), add the gradient of any auxiliary losses,
divide by the step's unit count and backward; then clip, set the lr, step the optimizer and zero
the gradients. In fp16 a `LossScaler` (train/precision.py) scales the loss before backward and the
gradients back before clipping; a step whose gradients overflow is skipped. What varies around that
step is passed in or wraps it:

- `ModelLoss` (made by `make_loss_sum`): the model as the step runs it. `loss_sum` is
  `model(**inputs)` then `token_loss_sum`, or the chunked loss (train/fastloss.py) that takes the
  backbone's hidden states instead of full logits; `with_boundaries` adds example boundaries to
  packed rows when the model runs per-example attention (train/varlen.py). With an `objective`
  (train/preference.py: DPO, IPO, SimPO, ORPO; train/grpo.py: GRPO) the objective turns the batch into
  its loss sum and says what a unit is (a pair of answers; a completion token, or a completion). GRPO's
  micro-batches are made by the objective at the start of the step (`Objective.prepare`: the completions
  it samples for the step's prompts), before `train_step` sees them.
- `parallel` (train/distributed.py): sums the token count over the ranks and lets DDP or FSDP
  synchronise gradients on a rank's last micro-batch only; a single process passes nothing.
- `halving_on_oom` wraps the step: after an out-of-memory error it redoes the same step with every
  micro-batch split into halves.

Normalisation rule (the one place it lives): an optimizer step sums the loss over all its
micro-batches and divides by the number of units (trained tokens, labels != -100, for SFT; pairs
for a preference objective) counted over all of them *before* any backward pass. Every
micro-batch then contributes `loss_sum / n_units`, so the accumulated gradient equals the
gradient of one big batch, no matter how the rows were split into micro-batches (or split again
after an out-of-memory; pairs are never cut apart).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.labels import IGNORE_INDEX
from lorakit.train.distributed import Parallel
from lorakit.train.fastloss import HeadSplit, chunked_loss_sum, split_head
from lorakit.train.precision import LossScaler, Precision
from lorakit.train.varlen import is_enabled as varlen_enabled
from lorakit.train.varlen import varlen_inputs

Batch = dict[str, Any]
Result = TypeVar("Result")
SINGLE_PROCESS = Parallel()
PAIRS = "pairs"  # a preference batch's number of pairs B: rows 0..B-1 chosen, rows B..2B-1 rejected
REFERENCE_LOGPS = "ref_logps"  # a preference batch's precomputed reference log-probs, one per row (2B,)
ADVANTAGES = "advantages"  # a GRPO batch's advantage of each sampled completion (N,) (train/grpo.py)
NOT_MODEL_INPUTS = frozenset({"labels", PAIRS, REFERENCE_LOGPS, ADVANTAGES})


@dataclass
class StepResult:
    """What one optimizer step reports to the loop."""

    loss_sum: torch.Tensor  # summed loss of this rank's micro-batches, detached
    trained_tokens: torch.Tensor  # trained tokens of the whole step, summed over the ranks
    grad_norm: torch.Tensor | None  # total gradient norm before clipping; None without max_grad_norm
    units: torch.Tensor | None = None  # the step's normaliser summed over the ranks: trained tokens, or pairs
    skipped: bool = False  # fp16: the gradients overflowed, so the optimizer did not step (train/precision.py)


def train_step(model: ModelLoss, micro_batches: list[Batch], optimizer: torch.optim.Optimizer, *,
               params: list[nn.Parameter], lr: float, max_grad_norm: float | None = None,
               parallel: Parallel = SINGLE_PROCESS, scaler: LossScaler | None = None) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's share of it); gradients are zero on entry.

    `params` are the trained parameters, in the order their gradient norm is taken. With a `scaler` (fp16), the
    backward pass runs on the scaled loss and the gradients are unscaled before clipping; a step whose gradients
    overflow is skipped (`StepResult.skipped`) and the scaler updated either way.
    """
    counts = parallel.total(model.counts(micro_batches))  # (units, trained tokens) of the whole step
    count = counts[0]
    n_units = max(1.0, float(count)) if count.device.type == "cpu" else count.clamp(min=1)
    n_units = n_units / parallel.world  # DDP and FSDP average gradients over the ranks
    step_loss = torch.zeros((), device=model.device)
    for index, batch in enumerate(micro_batches):
        with parallel.gradient_sync(last=index == len(micro_batches) - 1):  # DDP/FSDP: all-reduce after the last
            batch = to_device(model.with_boundaries(batch), model.device)
            with model.precision.autocast(model.device):
                summed = model.loss_sum(batch)  # model(**inputs) -> summed cross-entropy (or the objective's sum)
                summed = model.auxiliary.add_gradient(summed, lambda: model.units(batch))  # e.g. MoLE balancing
            loss = summed / n_units
            (loss if scaler is None else loss * scaler.scale).backward()  # fp16: scaled, so small gradients survive
        step_loss += summed.detach()
    with not_retried():  # an update stopped half way cannot be redone, so an out-of-memory here is raised
        finite = scaler is None or scaler.unscale(params, parallel.total)  # False: an inf/nan gradient, on any rank
        clip = max_grad_norm and finite
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True) if clip else None
        if finite:  # an overflowed step changes no weight and no optimizer state
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update(finite)
    return StepResult(loss_sum=step_loss, trained_tokens=counts[1], grad_norm=grad_norm, units=count,
                      skipped=not finite)


@dataclass
class Halving:
    """How many pieces each micro-batch is split into after out-of-memory errors (1 = none yet)."""

    enabled: bool = True
    parts: int = 1


def halving_on_oom(work: Callable[[list[Batch]], Result], micro_batches: list[Batch], halving: Halving,
                   on_retry: Callable[[int], None] = lambda max_rows: None) -> Result:
    """`work(pieces)`, the pieces being `micro_batches` each split into `halving.parts`; on out-of-memory,
    split every micro-batch into twice as many pieces and redo the whole work.

    The whole work is redone because an error in a backward pass may leave some gradients half
    added; `on_retry(max_rows)` runs before each retry and must drop them. Errors raised inside
    `not_retried()` are never retried.
    """
    if not micro_batches:
        raise LorakitError("an optimizer step or evaluation got no batches")
    while True:
        try:
            return work([piece for batch in micro_batches for piece in split_batch(batch, halving.parts)])
        except RuntimeError as error:
            if not (halving.enabled and is_out_of_memory(error)) or getattr(error, _NOT_RETRIED, False):
                raise
            max_rows = max(-(-batch_rows(b) // halving.parts) for b in micro_batches)
            if max_rows == 1:
                raise LorakitError(
                    "out of memory on a micro-batch of a single row: shorten max_length, or use "
                    "precision bf16 or gradient_checkpointing"
                ) from error
        # outside the except block, so the failed pass's tensors can be freed before retrying
        halving.parts *= 2
        on_retry(max_rows)


_NOT_RETRIED = "lorakit_not_retried"  # set on errors that `halving_on_oom` must pass on as they are


@contextlib.contextmanager
def not_retried() -> Iterator[None]:
    """Mark errors raised inside so that `halving_on_oom` re-raises them instead of retrying."""
    try:
        yield
    except RuntimeError as error:
        setattr(error, _NOT_RETRIED, True)
        raise


@torch.no_grad()
def evaluate(model: ModelLoss, batches: list[Batch], halving: Halving | None = None,
             on_retry: Callable[[int], None] = lambda max_rows: None) -> float:
    """Unit-weighted mean loss over `batches`: summed cross-entropy / trained tokens (SFT), summed pair losses /
    pairs (a preference objective)."""
    total = halving_on_oom(lambda pieces: sum(model(piece) for piece in pieces), batches,
                           halving or Halving(enabled=False), on_retry)
    n_units = model.counts(batches)[0]
    return float(total.item() / max(1, int(n_units.item())))


@dataclass
class ModelLoss:
    """The model as the training step runs it: the callable, where and in which precision, which loss.

    Calling it gives one micro-batch's summed loss exactly as `train_step` computes it before its
    backward pass (evaluation, and tests, call it this way).
    """

    call: nn.Module  # runs the forward pass: the model, maybe compiled or wrapped for DDP
    device: torch.device
    precision: Precision
    head: HeadSplit | None  # set: the chunked loss runs the backbone and this head instead of `call`
    auxiliary: AuxiliaryLosses  # the loop logs their running sum
    objective: Objective | None = None  # None: SFT's token cross-entropy; else e.g. DPO (train/preference.py), GRPO

    def units(self, batch: Batch) -> torch.Tensor:
        """What the step's loss is a mean over, in `batch`: trained tokens (SFT), or its objective's units."""
        if self.objective is not None:
            return self.objective.units(batch)
        if PAIRS in batch:
            raise LorakitError("train.objective is sft, but the batches hold preference pairs (prompt/chosen/"
                               "rejected rows); set train.objective to dpo, ipo, simpo or orpo")
        return (batch["labels"] != IGNORE_INDEX).sum()

    def counts(self, batches: list[Batch]) -> torch.Tensor:
        """(units, trained tokens) over `batches`, as a (2,) tensor (no device sync)."""
        return torch.stack([sum(self.units(batch) for batch in batches), count_trained_tokens(batches)])

    def logits(self, batch: Batch) -> torch.Tensor:
        """The logits (B, T, V) of `call` on `batch` (already on the device)."""
        return logits_of(self.call(**model_inputs(batch)))

    def with_boundaries(self, batch: Batch) -> Batch:
        """Packed rows plus their example boundaries when `call` runs per-example attention (the mask stays
        as the fallback); any other batch as it is."""
        return varlen_inputs(batch) if varlen_enabled(self.call) else batch

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed token cross-entropy of `batch` (already on the device) over its trained positions, or the
        objective's summed loss."""
        if self.objective is not None:
            return self.objective.loss_sum(self, batch)
        if self.head is not None:  # no full-vocabulary logits: the loss is taken in chunks of trained positions
            hidden = self.head.backbone(**model_inputs(batch)).last_hidden_state  # (B, T, C)
            return chunked_loss_sum(hidden, self.head.head, batch["labels"])
        return token_loss_sum(self.logits(batch), batch["labels"])

    def __call__(self, batch: Batch) -> torch.Tensor:
        """The summed loss of `batch`, with the auxiliary losses' gradient added (its value unchanged)."""
        batch = to_device(self.with_boundaries(batch), self.device)
        with self.precision.autocast(self.device):
            return self.auxiliary.add_gradient(self.loss_sum(batch), lambda: self.units(batch))


class Objective(Protocol):
    """What a step minimises besides SFT's token cross-entropy (train/preference.py, train/grpo.py), as `ModelLoss`
    runs it."""

    metric_names: tuple[str, ...]  # the metrics it logs (e.g. "rewards/accuracies")

    def prepare(self, micro_batches: list[Batch], step: int) -> list[Batch]:
        """This rank's training micro-batches of optimizer step `step` (0-based) from its share of the step's
        batches: the batches as they are, or (GRPO) the completions sampled now for the prompts they hold."""

    def units(self, batch: Batch) -> torch.Tensor:
        """The units of `batch` the loss is a mean over (e.g. its pairs), as a 0-dim tensor."""

    def loss_sum(self, model: ModelLoss, batch: Batch) -> torch.Tensor:
        """The loss of `batch` (on the device) summed over its units; also adds to its metric sums."""

    def take(self, evaluation: bool = False) -> torch.Tensor | None:
        """The metric sums since the last call, (len(metric_names) + 1,) with the unit count last, then reset;
        training passes and evaluation passes (no grad) are summed apart. None when nothing ran."""

    def restore(self, sums: list[float]) -> None:
        """Put back training sums `take()` gave (a resumed run continues its logging interval)."""

    def means(self, sums: torch.Tensor, prefix: str = "", seconds: float | None = None) -> dict[str, float]:
        """{prefix + name: value} logged from `take()`'s sums (summed over the ranks), which cover `seconds`."""

    def progress_text(self, record: dict[str, Any]) -> str:
        """The progress line's extra from a metrics record holding `means()`."""


def make_loss_sum(call: nn.Module, device: torch.device, precision: Precision, *,
                  chunked: bool = False, objective: Objective | None = None) -> ModelLoss:
    """`call` (the model, maybe compiled or wrapped) as the step runs it on `device` in `precision`.

    chunked=True: when `call` is a causal LM whose head `fastloss.split_head` recognises, the loss is
    taken from its backbone's hidden states in chunks over trained positions only; otherwise, or
    for other models, the plain path: logits, then `token_loss_sum`. An `objective` (a preference
    loss) uses the same head split to take its rows' log-probs at trained positions only.
    """
    head = split_head(call) if chunked else None
    return ModelLoss(call=call, device=device, precision=precision, head=head,
                     auxiliary=AuxiliaryLosses(auxiliary_loss_modules(call)), objective=objective)


def auxiliary_loss_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with an `auxiliary_loss()` method (e.g. a MoLE layer's load balancing), found once."""
    return [m for m in model.modules() if callable(getattr(m, "auxiliary_loss", None))]


@dataclass
class AuxiliaryLosses:
    """Auxiliary losses that modules report after each forward pass (already weighted by them).

    In training, their sum times the micro-batch's units (trained tokens, or pairs) joins the gradient
    of the summed loss, so after the division by the step's unit count it counts as a unit-weighted
    mean over micro-batches. The value returned stays the cross-entropy, so logged and evaluation losses
    compare across methods; `pending` sums the auxiliary part for the metrics log.
    """

    modules: list[nn.Module]
    pending: torch.Tensor | None = None

    def add_gradient(self, loss_sum: torch.Tensor, units: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`loss_sum` with the auxiliary losses' gradient added (its value unchanged); `units()`: the micro-batch's
        unit count (asked only when an auxiliary loss is there)."""
        values = [value for value in (m.auxiliary_loss() for m in self.modules) if value is not None]
        if not values or not torch.is_grad_enabled():
            return loss_sum
        weighted = sum(values) * units()
        self.pending = weighted.detach() if self.pending is None else self.pending + weighted.detach()
        return loss_sum + (weighted - weighted.detach())  # exactly +0 in value, +d(weighted) in gradient

    def take(self) -> torch.Tensor | None:
        """The auxiliary sum since the last call (then reset), or None when nothing reported one."""
        pending, self.pending = self.pending, None
        return pending


def model_inputs(batch: Batch) -> Batch:
    """Everything the model is called with: the batch without its labels (and a preference batch's pair count
    and reference log-probs)."""
    return {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a Hugging Face output object or a bare tensor."""
    return output.logits if hasattr(output, "logits") else output


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over trained positions; labels are already shifted (no shift here)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(  # logits (B, T, V), labels (B, T)
        logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_trained_tokens(batches: list[Batch]) -> torch.Tensor:
    """Trained tokens over `batches`, as a 0-dim tensor (no device sync)."""
    return sum((batch["labels"] != IGNORE_INDEX).sum() for batch in batches)


def count_input_tokens(batches: list[Batch]) -> int:
    """Positions fed to the model (padding included), read from shapes only."""
    return sum(batch["input_ids"].numel() for batch in batches)


def batch_rows(batch: Batch) -> int:
    """Rows (dim 0) of a batch; pairs of a preference batch (a pair's two rows are never split apart)."""
    return int(batch[PAIRS]) if PAIRS in batch else batch["input_ids"].shape[0]


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split every tensor of `batch` along dim 0 into up to `parts` pieces (4-D masks included); a preference
    batch is split by pairs, each piece keeping its pairs' chosen rows first and their rejected rows after."""
    parts = min(parts, batch_rows(batch))
    if parts == 1:
        return [batch]
    if PAIRS in batch:
        return _split_pairs(batch, parts)
    pieces: list[Batch] = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = torch.tensor_split(value, parts, dim=0) if torch.is_tensor(value) else [value] * parts
        for piece, chunk in zip(pieces, chunks):
            piece[key] = chunk
    return pieces


def _split_pairs(batch: Batch, parts: int) -> list[Batch]:
    """`split_batch` for a preference batch of B pairs: tensors of 2B rows (chosen 0..B-1, rejected B..2B-1) and,
    in the shared-prompt layout, tensors of B rows (one per pair: its input ids, positions and tree mask)."""
    pairs = int(batch[PAIRS])
    pieces = []
    for chosen in torch.tensor_split(torch.arange(pairs), parts):
        rows = torch.cat([chosen, chosen + pairs])  # this piece's chosen rows, then their rejected rows
        piece = {key: value.index_select(0, (chosen if len(value) == pairs else rows).to(value.device))
                 if torch.is_tensor(value) else value for key, value in batch.items()}
        piece[PAIRS] = len(chosen)
        pieces.append(piece)
    return pieces


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move the tensors of `batch` to `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch.OutOfMemoryError and for RuntimeErrors that report running out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )
