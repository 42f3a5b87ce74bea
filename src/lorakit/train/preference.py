"""Preference objectives (DPO and its family) as objectives of the one training step, and their reference model.

A preference batch (data/preference.py) holds B pairs as 2B rows: rows 0..B-1 the chosen answers, rows
B..2B-1 the rejected ones, in the same pair order, with labels shifted and -100 outside the answers (in the
shared-prompt layout, data/shared_prompt.py, the 2B label rows sit on B input rows, one per pair: label row r
reads the model's outputs of row r % B). Each row's log-probability is the sum of its token log-probs over
the trained positions, log p(y|x) = sum_t log p(y_t | x, y_<t); IPO, SimPO and ORPO use the average over
those positions instead, as their papers and TRL do. With policy pi, reference pi_ref, chosen y_w, rejected y_l:

    dpo    d = log pi(y_w) - log pi_ref(y_w) - (log pi(y_l) - log pi_ref(y_l))      (Rafailov et al. 2023)
           loss = -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)   (e: label_smoothing, cDPO)
    ipo    d as dpo's, on the averaged log-probs;  loss = (d - 1 / (2 beta))^2        (Azar et al. 2023)
    simpo  d = avg log pi(y_w) - avg log pi(y_l)                                   (Meng et al. 2024)
           loss = -(1 - e) log sigmoid(beta d - gamma) - e log sigmoid(-(beta d - gamma))
    orpo   a = avg log pi(y): log odds(y) = a - log(1 - exp(a))                    (Hong et al. 2024)
           loss = -avg log pi(y_w) - lambda log sigmoid(log odds(y_w) - log odds(y_l))

An optimizer step's loss is the mean over all its pairs: `PreferenceObjective.units` counts the pairs
before any backward pass, as the SFT step counts trained tokens (train/step.py), so the gradient does not
depend on how the pairs were split into micro-batches, ranks or out-of-memory pieces. ORPO's NLL term is
therefore each pair's own average (TRL averages it over the batch's tokens: equal when the chosen answers
are equally long). The logged metrics are TRL's: rewards/chosen and rewards/rejected (beta times the
log-ratio to the reference, summed log-probs, for dpo and ipo; beta, or lambda for orpo, times the average
log-prob for the reference-free ones), rewards/margins, rewards/accuracies (chosen reward above
rejected), logps/chosen, logps/rejected, and ORPO's nll_loss, log_odds_ratio and log_odds_chosen.

The reference (dpo, ipo; `make_reference`, train.reference) runs under no_grad in eval mode (no dropout),
before the policy's forward pass on the same micro-batch:

    adapters_off  the same model with its adapter switched off (adapters.dispatch.adapters_disabled): the
                  base model exactly, no second copy of any weight
    copy          a frozen copy of the initial trainable weights, swapped in for the reference pass
                  (torch.func.functional_call): a whole model's size for full fine-tuning, an adapter's
                  size for an adapter started from a trained one (model.init_adapter)
    precomputed   one pass of the above over the training and validation pairs before the first step; each
                  row's log-prob is kept in a table keyed by its tokens, and attached to every batch as
                  `ref_logps`: no copy and no reference pass per step, about 125 bytes of host memory a row
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.dispatch import adapters_disabled
from lorakit.adapters.state import get_state
from lorakit.errors import ConfigError, LorakitError
from lorakit.labels import IGNORE_INDEX
from lorakit.train.config import AUTO, TrainConfig
from lorakit.train.fastloss import HeadSplit, split_head
from lorakit.train.precision import Precision
from lorakit.train.step import (PAIRS, REFERENCE_LOGPS, Batch, ModelLoss, logits_of, model_inputs, to_device)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


# ----------------------------------------------------------------------------- the math


@dataclass
class RowLogps:
    """Per-row log-probabilities of a batch's answers: rows 0..B-1 chosen, B..2B-1 rejected."""

    sums: torch.Tensor  # (2B,) sum of token log-probs over trained positions, fp32
    counts: torch.Tensor  # (2B,) trained positions

    def means(self) -> torch.Tensor:
        """(2B,) average token log-prob of each row (0 for a row with no trained position)."""
        return self.sums / self.counts.clamp(min=1)


def trained_positions(labels: torch.Tensor, source_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label positions, source positions), both (N,) indices into the flattened (R, T) labels and (S, T) model
    outputs, of every trained target: label row r reads output row r % S (S = R for padded pairs; S = B = R / 2
    for shared-prompt rows, where row b holds both sides of pair b, data/shared_prompt.py)."""
    width = labels.shape[1]
    keep = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)  # (N,) positions with a target
    return keep, (keep // width) % source_rows * width + keep % width


def _summed(token: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor) -> RowLogps:
    """RowLogps from the token log-probs (N,) at the label positions `keep` of `labels` (R, T)."""
    rows, width = labels.shape
    sums = torch.zeros(rows, dtype=token.dtype, device=token.device).index_add(0, keep // width, token)
    return RowLogps(sums=sums, counts=(labels != IGNORE_INDEX).sum(-1))


def row_logps(logits: torch.Tensor, labels: torch.Tensor) -> RowLogps:
    """Each row's log-probability of its trained tokens; logits (S, T, V), labels (R, T) already shifted, label row
    r read from logits row r % S (`trained_positions`)."""
    rows, width, vocab = logits.shape
    if rows != labels.shape[0]:  # shared-prompt rows: each logits row serves two label rows
        keep, source = trained_positions(labels, rows)
        picked = logits.reshape(-1, vocab).index_select(0, source).float()  # (N, V)
        return _summed(-F.cross_entropy(picked, labels.reshape(-1).index_select(0, keep), reduction="none"), keep,
                       labels)
    token = -F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(rows, width)  # (R, T), 0 where untrained
    return RowLogps(sums=token.sum(-1), counts=(labels != IGNORE_INDEX).sum(-1))


def trained_row_logps(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> RowLogps:
    """`row_logps` from the backbone's hidden states (S, T, C), with the head applied at trained positions only:
    prompt and padding positions need no logits (the chunked loss's idea, train/fastloss.py)."""
    keep, source = trained_positions(labels, hidden.shape[0])
    logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, source))  # (N, V)
    return _summed(-F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, keep), reduction="none"),
                   keep, labels)


def model_logps(model: nn.Module, head: HeadSplit | None, batch: Batch) -> RowLogps:
    """The row log-probs of `batch` under `model`: through its backbone and, at trained positions only, its head
    (`head`, from `fastloss.split_head`), else from its full logits."""
    if head is None:
        return row_logps(logits_of(model(**model_inputs(batch))), batch["labels"])
    hidden = head.backbone(**model_inputs(batch)).last_hidden_state  # (R, T, C)
    return trained_row_logps(hidden, head.head, batch["labels"])


def halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected): the first and second half of a (2B,) per-row tensor."""
    pairs = values.shape[0] // 2
    return values[:pairs], values[pairs:]


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): the logistic loss with e of the labels assumed flipped."""
    loss = -F.logsigmoid(logits)
    return loss if not label_smoothing else (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO's per-pair loss from the policy-to-reference log-ratios of the chosen and rejected answers (B,)."""
    return smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)


def ipo_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO's per-pair loss (Azar et al. 2023, eq. 17) from length-averaged log-ratios (B,)."""
    return (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO's per-pair loss (Meng et al. 2024, eq. 6) from the policy's average log-probs (B,)."""
    return smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012); each branch gets inputs on
    which it is finite, so neither puts NaN into the other's gradient."""
    cut = -math.log(2)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_log_odds(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l), odds(y) = p / (1 - p) with p the average-token probability (B,)."""
    return (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO's per-pair loss (Hong et al. 2024, eq. 6): the chosen answer's NLL plus lambda times the odds-ratio term."""
    return -chosen_avg - lam * F.logsigmoid(orpo_log_odds(chosen_avg, rejected_avg))


@dataclass(frozen=True)
class PairTerms:
    """One micro-batch's per-pair losses (B,) and per-pair metric values {name: (B,)}."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


def reward_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics (before the mean over pairs)."""
    return {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
            "rewards/margins": chosen_reward - rejected_reward,
            "rewards/accuracies": (chosen_reward > rejected_reward).float(),
            "logps/chosen": chosen_logps, "logps/rejected": rejected_logps}


def pair_terms(cfg: TrainConfig, policy: RowLogps, reference: torch.Tensor | None) -> PairTerms:
    """The per-pair losses and metrics of objective `cfg.objective` from the policy's row log-probs and the
    reference's summed row log-probs (2B,) (None for the reference-free objectives)."""
    beta, objective = cfg.beta, cfg.objective
    if objective in ("dpo", "ipo"):
        ratio = policy.sums - reference  # (2B,) summed log-ratio of each row
        chosen_ratio, rejected_ratio = halves(ratio)
        if objective == "dpo":
            losses = dpo_loss(chosen_ratio, rejected_ratio, beta, cfg.label_smoothing)
        else:
            averaged = ratio / policy.counts.clamp(min=1)
            losses = ipo_loss(*halves(averaged), beta)
        metrics = reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                                 *halves(policy.sums.detach()))
        return PairTerms(losses, metrics)
    chosen_avg, rejected_avg = halves(policy.means())
    if objective == "simpo":
        losses = simpo_loss(chosen_avg, rejected_avg, beta, cfg.simpo_gamma, cfg.label_smoothing)
        scale = beta
    else:
        losses = orpo_loss(chosen_avg, rejected_avg, cfg.orpo_lambda)
        scale = cfg.orpo_lambda
    averages = policy.means().detach()
    metrics = reward_metrics(scale * halves(averages)[0], scale * halves(averages)[1], *halves(averages))
    if objective == "orpo":
        log_odds = orpo_log_odds(*halves(averages))
        metrics.update({"nll_loss": -halves(averages)[0], "log_odds_ratio": F.logsigmoid(log_odds),
                        "log_odds_chosen": log_odds})
    return PairTerms(losses, metrics)


# ----------------------------------------------------------------------------- the reference model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of `model` in eval mode (no dropout) inside the block; each module's own mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


Measure = Callable[[nn.Module, HeadSplit | None, Batch], torch.Tensor]  # (model, head, batch) -> log-probs


def summed_logps(model: nn.Module, head: HeadSplit | None, batch: Batch) -> torch.Tensor:
    """The summed row log-probs (2B,) of a preference batch: what the reference gives the preference objectives."""
    return model_logps(model, head, batch).sums


class AdaptersOff:
    """The reference is the model itself with its adapter switched off: the base model, no second copy. `fast`: the
    head at trained positions only, where the model allows (as the policy's pass, train.chunked_loss)."""

    kind = "adapters_off"

    def __init__(self, model: nn.Module, fast: bool = False) -> None:
        self.model, self.head = model, split_head(model) if fast else None

    def describe(self) -> str:
        """The line the run prints."""
        return "reference: the same model with its adapter switched off (the base model; no second copy)"

    @torch.no_grad()
    def run(self, measure: Measure, batch: Batch) -> torch.Tensor:
        """`measure(model, head, batch)` under the base model, in eval mode (GRPO: per-token log-probs)."""
        with eval_mode(self.model), adapters_disabled(self.model):
            return measure(self.model, self.head, batch)

    def logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probs (2B,) of the batch's rows under the base model."""
        return self.run(summed_logps, batch)


class Initial:
    """The model as it is now, before any step: the reference a precomputing pass runs when it is not the base."""

    kind = "initial"

    def __init__(self, model: nn.Module, fast: bool = False) -> None:
        self.model, self.head = model, split_head(model) if fast else None

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probs (2B,) of the batch's rows under the model's current weights."""
        with eval_mode(self.model):
            return model_logps(self.model, self.head, batch).sums


class _Runner(nn.Module):
    """A measure of a model held as a child, so `functional_call` can swap the child's weights for one call."""

    def __init__(self, model: nn.Module, fast: bool) -> None:
        super().__init__()
        self.model, self.head = model, split_head(model) if fast else None

    def forward(self, batch: Batch, measure: Measure) -> torch.Tensor:
        return measure(self.model, self.head, batch)


class WeightCopy:
    """The reference is a frozen copy of the initial trainable weights, run through the same modules."""

    kind = "copy"

    def __init__(self, model: nn.Module, fast: bool = False) -> None:
        self.model, self.runner = model, _Runner(model, fast)
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def nbytes(self) -> int:
        """Memory the copy takes."""
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def describe(self) -> str:
        """The line the run prints."""
        numbers = sum(t.numel() for t in self.weights.values())
        return (f"reference: a frozen copy of the initial trainable weights ({numbers:,} numbers, "
                f"{self.nbytes() / 2**20:,.1f} MiB), swapped in for each reference pass")

    @torch.no_grad()
    def run(self, measure: Measure, batch: Batch) -> torch.Tensor:
        """`measure(model, head, batch)` under the initial weights, in eval mode (GRPO: per-token log-probs)."""
        weights = {f"model.{name}": value for name, value in self.weights.items()}
        with eval_mode(self.model):
            return torch.func.functional_call(self.runner, weights, (batch, measure), strict=False, tie_weights=True)

    def logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probs (2B,) of the batch's rows under the initial weights."""
        return self.run(summed_logps, batch)


def row_key(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> bytes:
    """A row's identity in the precomputed table: a 16-byte digest of its real tokens and trained positions (and
    of a shared-prompt row's position ids, which say where its branches start)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (input_ids, labels) if position_ids is None else (input_ids, labels, position_ids):
        digest.update(part.numpy().tobytes())
    return digest.digest()


def batch_keys(batch: Batch) -> list[bytes]:
    """`row_key` of every label row of a (CPU) batch, padding cut off: padded pairs by their attention mask;
    shared-prompt rows (label row r on input row r % B) after the row's last trained target, whose token is the
    last one its log-prob depends on (the cut is then the same in every batch the pair lands in), their position
    ids included."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    if ids.shape[0] != labels.shape[0]:
        width = labels.shape[1]
        trained = labels != IGNORE_INDEX  # (2B, T)
        ends = torch.where(trained.any(-1), width - trained.flip(-1).int().argmax(-1) + 1, 0).clamp(max=width)
        positions = batch["position_ids"].cpu()
        return [row_key(ids[row % len(ids), :n], labels[row, :n], positions[row % len(ids), :n])
                for row, n in enumerate(ends.tolist())]
    lengths = mask.cpu().sum(-1).tolist() if torch.is_tensor(mask) and mask.dim() == 2 else [ids.shape[1]] * len(ids)
    return [row_key(ids[row, :n], labels[row, :n]) for row, n in enumerate(lengths)]


class Precomputed:
    """The reference's row log-probs, computed once before training and attached to every batch."""

    kind = "precomputed"

    def __init__(self, table: dict[bytes, float], seconds: float) -> None:
        self.table, self.seconds = table, seconds

    def describe(self) -> str:
        """The line the run prints."""
        return (f"reference: log-probs of {len(self.table):,} distinct rows precomputed in one pass "
                f"({self.seconds:.1f} s) before the first step; no reference pass per step")

    def attach(self, batch: Batch) -> Batch:
        """`batch` with its rows' reference log-probs as `ref_logps` (2B,)."""
        keys = batch_keys(batch)
        missing = sum(key not in self.table for key in keys)
        if missing:
            raise LorakitError(f"{missing} rows of a batch have no precomputed reference log-prob: the batches "
                               "changed after the reference pass (train_batches must be deterministic)")
        return {**batch, REFERENCE_LOGPS: torch.tensor([self.table[key] for key in keys], dtype=torch.float32)}

    def logps(self, batch: Batch) -> torch.Tensor:
        """The precomputed summed log-probs (2B,) attached to `batch`."""
        if REFERENCE_LOGPS not in batch:
            raise LorakitError("a preference batch reached the step without its precomputed reference log-probs")
        return batch[REFERENCE_LOGPS]


class AttachedBatches(Sequence):
    """An epoch's batches (a list or LazyBatches) with the precomputed reference attached when each is read."""

    def __init__(self, batches: Sequence[Batch], reference: Precomputed) -> None:
        self.batches, self.reference = batches, reference

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.reference.attach(batch) for batch in self.batches[index]]
        return self.reference.attach(self.batches[index])


def precompute(live: AdaptersOff | Initial, batches: Sequence[Batch], device: torch.device, precision: Precision,
               rank: int = 0, world: int = 1) -> Precomputed:
    """One reference pass over `batches` (this rank's share under torchrun, then gathered): the table of row
    log-probs that `Precomputed` attaches."""
    started, table = time.perf_counter(), {}
    for batch in list(batches)[rank::world]:
        keys = batch_keys(batch)
        with precision.autocast(device):
            values = live.logps(to_device(batch, device)).float().cpu().tolist()
        table.update(zip(keys, values))
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, table)
        table = {key: value for share in shares for key, value in share.items()}
    return Precomputed(table, time.perf_counter() - started)


Reference = AdaptersOff | WeightCopy | Precomputed


def reference_kind(cfg: TrainConfig, model: nn.Module) -> str | None:
    """train.reference resolved for `model` (None for the reference-free objectives, grpo without a KL penalty
    and sft)."""
    if not cfg.uses_reference:
        return None
    state = get_state(model)
    full = state is None or getattr(state.method, "name", "") == "full"
    if cfg.reference == "adapters_off" and full:
        raise ConfigError("train.reference: adapters_off needs an adapter method; full fine-tuning (or a model "
                          "without a lorakit adapter) has no adapter to switch off: use copy or precomputed")
    if cfg.reference != AUTO:
        return cfg.reference
    return "copy" if full or state.started_from else "adapters_off"


def make_reference(cfg: TrainConfig, model: nn.Module, batches: Callable[[], Sequence[Batch]], device: torch.device,
                   precision: Precision, rank: int = 0, world: int = 1, sharded: bool = False,
                   fast: bool = False) -> Reference | None:
    """The reference of a dpo, ipo or grpo (with a KL penalty) run on `model` as it is now (its initial weights: build it before a
    checkpoint is loaded). `batches()`: every batch to precompute (train.reference precomputed). `sharded`: the
    model is about to be sharded (FSDP2), where a copy would be a whole unsharded model per rank. `fast`: the
    head at trained positions only, as the policy's pass (`model_logps`)."""
    kind = reference_kind(cfg, model)
    if kind is None:
        return None
    if kind == "copy" and sharded:
        raise ConfigError("train.reference: copy is not available under FSDP (every rank would hold a whole "
                          "unsharded model); use train.reference: precomputed")
    if kind == "adapters_off":
        return AdaptersOff(model, fast)
    if kind == "copy":
        return WeightCopy(model, fast)
    state = get_state(model)  # precomputed: the base for an adapter trained from scratch, else the model as it is
    fresh_adapter = state is not None and getattr(state.method, "name", "") != "full" and not state.started_from
    live = AdaptersOff(model, fast) if fresh_adapter else Initial(model, fast)
    return precompute(live, batches(), device, precision, rank, world)


# ----------------------------------------------------------------------------- the objective


class PreferenceObjective:
    """dpo, ipo, simpo or orpo as `train.step.ModelLoss` runs it: pairs are its units (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, reference: Reference | None) -> None:
        self.cfg, self.reference = cfg, reference
        self.metric_names = METRICS + (ORPO_METRICS if cfg.objective == "orpo" else ())
        self.sums: dict[bool, torch.Tensor | None] = {False: None, True: None}  # evaluation? -> sums, count last

    def prepare(self, micro_batches: list[Batch], step: int) -> list[Batch]:
        """The step's micro-batches as they are (see `train.step.Objective`)."""
        return micro_batches

    def units(self, batch: Batch) -> torch.Tensor:
        """The pairs of `batch` whose both answers have a trained token (a rank's filler copy has none)."""
        if PAIRS not in batch:
            raise LorakitError(f"train.objective {self.cfg.objective} trains on preference pairs, but the batches "
                               "are SFT examples; give rows with prompt/chosen/rejected (data.format preference) "
                               "or set train.objective: sft")
        chosen, rejected = halves((batch["labels"] != IGNORE_INDEX).any(-1))
        return (chosen & rejected).sum()

    def loss_sum(self, model: ModelLoss, batch: Batch) -> torch.Tensor:
        """The summed per-pair loss of `batch` (on the device); its metric sums are kept for the log."""
        labels = batch["labels"]
        if labels.shape[0] != 2 * int(batch[PAIRS]):
            raise LorakitError(f"a preference batch of {int(batch[PAIRS])} pairs must hold 2 x that many rows, "
                               f"got {labels.shape[0]}")
        reference = self.reference.logps(batch) if self.reference is not None else None  # before the policy pass
        terms = pair_terms(self.cfg, model_logps(model.call, model.head, batch), reference)
        valid = torch.stack(halves((labels != IGNORE_INDEX).any(-1))).all(0).to(terms.losses.dtype)  # (B,)
        self._add(terms.metrics, valid, evaluation=not torch.is_grad_enabled())
        return (terms.losses * valid).sum()

    def _add(self, metrics: dict[str, torch.Tensor], valid: torch.Tensor, evaluation: bool) -> None:
        values = torch.stack([*((metrics[name].float() * valid).sum() for name in self.metric_names), valid.sum()])
        held = self.sums[evaluation]
        self.sums[evaluation] = values if held is None else held.to(values.device) + values

    def take(self, evaluation: bool = False) -> torch.Tensor | None:
        """The metric sums since the last call, unit count last, then reset (see `train.step.Objective`)."""
        sums, self.sums[evaluation] = self.sums[evaluation], None
        return sums

    def restore(self, sums: list[float]) -> None:
        """Put back training sums that `take` gave (a resumed run continues its logging interval)."""
        self.sums[False] = torch.tensor(sums, dtype=torch.float32) if sums else None

    def means(self, sums: torch.Tensor, prefix: str = "", seconds: float | None = None) -> dict[str, float]:
        """{prefix + name: mean per pair} from `take()`'s sums (the values logged; `seconds` is not needed)."""
        values = sums.tolist()
        count = max(1.0, values[-1])
        return {prefix + name: value / count for name, value in zip(self.metric_names, values)}

    def progress_text(self, record: dict[str, Any]) -> str:
        """The progress line's extra: reward accuracy and margin."""
        return f"acc {record['rewards/accuracies']:.2f} | margin {record['rewards/margins']:.3f}"


def objective_lines(cfg: TrainConfig, reference: Reference | None, fast: bool) -> list[str]:
    """What the run prints about its preference objective: the loss, its settings, the reference, the fast paths."""
    settings = {"dpo": f"beta {cfg.beta}" + (f", label_smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""),
                "ipo": f"beta {cfg.beta}", "simpo": f"beta {cfg.beta}, gamma {cfg.simpo_gamma}"
                + (f", label_smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""),
                "orpo": f"lambda {cfg.orpo_lambda}"}[cfg.objective]
    lines = [f"objective {cfg.objective} ({settings}): the loss of a step is the mean over its pairs; "
             + (reference.describe() if reference is not None else "reference-free (no reference model)")]
    if cfg.chunked_loss and not fast:
        lines.append("train.chunked_loss: not for this model here (a hooked forward, an adapted or unusual head, "
                     "or DDP's wrapper): each answer's log-probs come from the full logits")
    return lines
