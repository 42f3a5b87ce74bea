"""The loss of a batch and the work of one optimizer step, written once for every method.

Normalisation rule (the one place it lives): an optimizer step sums the token cross-entropy
over all its micro-batches and divides by the number of trained tokens (labels != -100)
counted over all of them *before* any backward pass. Every micro-batch then contributes
`loss_sum / n_tokens`, so the accumulated gradient equals the gradient of one big batch, no
matter how the rows were split into micro-batches (or split again after an out-of-memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.labels import IGNORE_INDEX
from lorakit.train.fastloss import chunked_loss_sum, split_head
from lorakit.train.precision import Precision
from lorakit.train.varlen import is_enabled as varlen_enabled
from lorakit.train.varlen import varlen_inputs

Batch = dict[str, Any]


def model_inputs(batch: Batch) -> Batch:
    """Everything the model is called with: the batch without its labels."""
    return {key: value for key, value in batch.items() if key != "labels"}


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
    """Rows (dim 0) of a batch."""
    return batch["input_ids"].shape[0]


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split every tensor of `batch` along dim 0 into up to `parts` pieces (4-D masks included)."""
    parts = min(parts, batch_rows(batch))
    if parts == 1:
        return [batch]
    pieces: list[Batch] = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = torch.tensor_split(value, parts, dim=0) if torch.is_tensor(value) else [value] * parts
        for piece, chunk in zip(pieces, chunks):
            piece[key] = chunk
    return pieces


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move the tensors of `batch` to `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch.OutOfMemoryError and for RuntimeErrors that report running out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def make_loss_sum(call: nn.Module, device: torch.device, precision: Precision, *,
                  chunked: bool = False) -> Callable[[Batch], torch.Tensor]:
    """A function batch -> summed token loss, running `call` (the model, maybe compiled) on `device`.

    chunked=True: when `call` is a causal LM whose head `fastloss.split_head` recognises, run its
    backbone and take the loss in chunks over trained positions only (no full-vocabulary
    logits); otherwise, or for other models, the plain path: logits, then `token_loss_sum`.
    When `call` runs the "lorakit_varlen" attention (see train/varlen.py), packed batches get
    their example boundaries added, so attention runs per example instead of with the dense mask.
    """
    split = split_head(call) if chunked and not _forward_is_hooked(call) else None
    auxiliary = AuxiliaryLosses(auxiliary_loss_modules(call))

    def loss_sum(batch: Batch) -> torch.Tensor:
        if varlen_enabled(call):  # packed rows: pass the example boundaries (the mask stays as the fallback)
            batch = varlen_inputs(batch)
        batch = to_device(batch, device)
        with precision.autocast(device):
            if split is not None:
                hidden = split.backbone(**model_inputs(batch)).last_hidden_state  # (B, T, C)
                return auxiliary.add_gradient(chunked_loss_sum(hidden, split.head, batch["labels"]), batch)
            output = call(**model_inputs(batch))
        return auxiliary.add_gradient(token_loss_sum(logits_of(output), batch["labels"]), batch)

    loss_sum.auxiliary = auxiliary  # the loop logs its running sum
    return loss_sum


def _forward_is_hooked(model: nn.Module) -> bool:
    """True when hooks sit on the model's own forward (e.g. prompt tuning's): the chunked path would skip them."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile, the hooks are on the original module
    return bool(model._forward_pre_hooks or model._forward_hooks)


def auxiliary_loss_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with an `auxiliary_loss()` method (e.g. a MoLE layer's load balancing), found once."""
    return [m for m in model.modules() if callable(getattr(m, "auxiliary_loss", None))]


@dataclass
class AuxiliaryLosses:
    """Auxiliary losses that modules report after each forward pass (already weighted by them).

    In training, their sum times the micro-batch's trained tokens joins the gradient of the summed
    loss, so after the division by the step's token count it counts as a token-weighted mean over
    micro-batches. The value returned stays the cross-entropy, so logged and evaluation losses
    compare across methods; `pending` sums the auxiliary part for the metrics log.
    """

    modules: list[nn.Module]
    pending: torch.Tensor | None = None

    def add_gradient(self, loss_sum: torch.Tensor, batch: Batch) -> torch.Tensor:
        """`loss_sum` with the auxiliary losses' gradient added (its value unchanged)."""
        values = [value for value in (m.auxiliary_loss() for m in self.modules) if value is not None]
        if not values or not torch.is_grad_enabled():
            return loss_sum
        weighted = sum(values) * (batch["labels"] != IGNORE_INDEX).sum()
        self.pending = weighted.detach() if self.pending is None else self.pending + weighted.detach()
        return loss_sum + (weighted - weighted.detach())  # exactly +0 in value, +d(weighted) in gradient

    def take(self) -> torch.Tensor | None:
        """The auxiliary sum since the last call (then reset), or None when nothing reported one."""
        pending, self.pending = self.pending, None
        return pending


@dataclass
class Halving:
    """How many pieces each micro-batch is split into after out-of-memory errors (1 = none yet)."""

    enabled: bool = True
    parts: int = 1


def _sum_over_pieces(batches: list[Batch], parts: int, work: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
    total: torch.Tensor | None = None
    for batch in batches:
        for piece in split_batch(batch, parts):
            value = work(piece)
            total = value if total is None else total + value
    if total is None:
        raise LorakitError("an optimizer step or evaluation got no batches")
    return total


def run_with_halving(
    batches: list[Batch],
    work: Callable[[Batch], torch.Tensor],
    halving: Halving,
    on_retry: Callable[[int], None],
) -> torch.Tensor:
    """Sum `work(piece)` over the pieces of `batches`; on out-of-memory, split finer and start over.

    `on_retry(max_rows)` runs before each restart (it must drop partial gradients). The whole
    list is redone because an error in a backward pass may leave some gradients half added.
    """
    while True:
        try:
            return _sum_over_pieces(batches, halving.parts, work)
        except RuntimeError as error:
            if not (halving.enabled and is_out_of_memory(error)):
                raise
            max_rows = max(-(-batch_rows(b) // halving.parts) for b in batches)
            if max_rows == 1:
                raise LorakitError(
                    "out of memory on a micro-batch of a single row: shorten max_length, or use "
                    "precision bf16 or gradient_checkpointing"
                ) from error
        # outside the except block, so the failed pass's tensors can be freed before retrying
        halving.parts *= 2
        on_retry(max_rows)


def accumulate_gradients(
    loss_sum: Callable[[Batch], torch.Tensor],
    micro_batches: list[Batch],
    n_tokens: torch.Tensor | float,
    halving: Halving | None = None,
    on_retry: Callable[[int], None] = lambda max_rows: None,
) -> torch.Tensor:
    """Backward every micro-batch with loss_sum / n_tokens; returns the detached summed loss.

    Gradients add up in `.grad`; `on_retry` must clear them when a split restarts the step.
    """

    def forward_backward(piece: Batch) -> torch.Tensor:
        summed = loss_sum(piece)
        (summed / n_tokens).backward()
        return summed.detach()

    return run_with_halving(micro_batches, forward_backward, halving or Halving(enabled=False), on_retry)


@torch.no_grad()
def evaluate(
    loss_sum: Callable[[Batch], torch.Tensor], batches: list[Batch], halving: Halving | None = None,
    on_retry: Callable[[int], None] = lambda max_rows: None,
) -> float:
    """Token-weighted mean loss over `batches` (summed cross-entropy / trained tokens)."""
    total = run_with_halving(batches, loss_sum, halving or Halving(enabled=False), on_retry)
    n_tokens = count_trained_tokens(batches)
    return float(total.item() / max(1, int(n_tokens.item())))

