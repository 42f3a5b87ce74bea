"""GRPO (train.objective grpo) as an objective of the one training step: the rollout, the loss and its metrics.

The math (advantages, the clipped per-token loss, its normalisations) is train/grpo_loss.py's; the rewards are
train/rewards.py's. This module runs them inside the loop (train/loop.py), as train/preference.py runs DPO:

    rollout   at every optimizer step the loop hands `GRPOObjective.prepare` this rank's prompt batches
              (data/prompts.py); for each prompt the model, in eval mode and without gradients, samples
              num_generations completions with the KV-cache decoder (decoding/decode.py) at train.temperature /
              top_p / top_k, each up to max_completion_length tokens. Completion g of prompt i at step s is
              sampled from its own generator seeded by (train.seed, s, i, g) (`sample_seed`), so a resumed run
              samples exactly what the uninterrupted one did, whatever the batch it shares. Each completion
              ends at its first stop token (EOS, or the format's end-of-turn token), which is trained, as TRL
              trains it; the reward sees the text before it.
    score     train.rewards score each completion (rewards.score: the weighted sum) against its prompt's row;
              advantages are group-relative (grpo_loss.group_advantages over the step's rewards: the group's
              std, or the std of every rank's rewards of the step for scale_rewards batch).
    batches   each prompt batch becomes one training micro-batch of its prompts' completions: prompt + completion
              per row, right-padded, labels (shifted, as SFT's) on the completion tokens only, and each row's
              advantage. The old policy is the policy itself (one optimisation step per rollout: ratio 1).
    loss      per-token log-probs of the completion tokens at the sampling temperature (the head applied at those
              positions only, where the chunked loss would), the reference's too when grpo_beta > 0 (before the
              policy pass, under no grad: train/preference.py's reference, adapters switched off or a frozen
              copy); `grpo_loss.loss_sum` per micro-batch, divided by the step's `loss_units` counted before any
              backward pass (train/step.py's rule), so accumulation, ranks and out-of-memory halving do not
              change the gradient.

Validation prompts (data.val_source, ...) are scored at each evaluation: one greedy completion per prompt; the
eval loss is minus the mean reward (so the best eval step is the one with the highest reward), logged with
eval_reward and each reward's mean. Under torchrun each rank samples its own share of the step's prompts (ddp;
FSDP would need every rank in every decoding pass, and is refused).

Metrics per logged step (TRL's names where TRL has the metric): reward (mean per completion), reward_std (the
mean of the groups' stds, as TRL's), rewards/<name>/mean, completions/mean_length and completions/clipped_ratio
(cut at max_completion_length), kl (grpo_beta > 0), clip_ratio/low_mean, high_mean, region_mean (fractions of
completion tokens), sampling_tokens_per_s (sampled tokens per second of decoding), train_tokens_per_s (positions
of the training micro-batches per second of the rest of the interval) and sampling_share (decoding's share of
the interval's wall time).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lorakit.data.batching import collate_padded
from lorakit.data.prompts import PROMPT_INDEX, PromptExample, batch_prompts
from lorakit.decoding.decode import decode
from lorakit.decoding.sampling import Sampling
from lorakit.errors import ConfigError, LorakitError
from lorakit.labels import IGNORE_INDEX
from lorakit.train import grpo_loss
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import Parallel
from lorakit.train.fastloss import HeadSplit
from lorakit.train.precision import Precision
from lorakit.train.preference import Reference, eval_mode, trained_positions
from lorakit.train.rewards import Reward, score
from lorakit.train.step import ADVANTAGES, Batch, ModelLoss, logits_of, model_inputs

# the sums the objective keeps between two metrics records (each rank's; the loop sums them over the ranks)
ROLLOUT_SUMS = ("completions", "reward", "group_std", "groups", "length", "clipped", "sampled_tokens", "sampling_s",
                "train_positions")
TOKEN_SUMS = ("tokens", "kl", *grpo_loss.CLIP_METRICS)


@dataclass
class Rollout:
    """What GRPO samples from besides the model and its config; the run (run.py) builds it."""

    tokenizer: Any
    prompts: Sequence[PromptExample]  # the run's prompt table: the training prompts, then the validation ones
    rewards: list[tuple[str, float, Reward]]  # rewards.load_rewards(train.rewards)
    stop_ids: frozenset[int]  # the tokens that end a completion
    pad_id: int

    def text(self, index: int) -> str:
        """Prompt `index` as the rewards get it: its tokens decoded, special tokens left out."""
        return self.tokenizer.decode(self.prompts[index].input_ids, skip_special_tokens=True)


def sample_seed(seed: int, step: int, prompt: int, generation: int) -> int:
    """The seed of completion `generation` of prompt `prompt` (its index in the prompt table) at optimizer step
    `step` (0-based) of a run seeded `seed`: a 63-bit hash, the same in every process and on every resume."""
    digest = hashlib.blake2b(f"lorakit-grpo:{seed}:{step}:{prompt}:{generation}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


@dataclass
class Sampled:
    """The completions of one prompt batch, each row after its prompt's group in order (prompt 0's G, ...)."""

    prompts: list[list[int]]  # per completion: its prompt's ids
    indices: list[int]  # per completion: its prompt's index in the prompt table
    tokens: list[list[int]]  # per completion: the sampled ids, its stop token last when it stopped


def completion_logps(call: nn.Module, head: HeadSplit | None, batch: Batch, temperature: float) -> torch.Tensor:
    """(N, T) log-probs of the trained (completion) tokens of `batch` at `temperature`, 0 elsewhere; the logits
    are taken at those positions only when `head` (the backbone and its linear head) is given."""
    labels = batch["labels"]
    rows, width = labels.shape
    keep, source = trained_positions(labels, rows)  # (K,) label positions and the output positions they read
    if head is None:
        logits = logits_of(call(**model_inputs(batch)))  # (N, T, V)
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, source)  # (K, V)
    else:
        hidden = head.backbone(**model_inputs(batch)).last_hidden_state  # (N, T, C)
        picked = head.head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, source))  # (K, V)
    token = -F.cross_entropy(picked.float() / temperature, labels.reshape(-1).index_select(0, keep), reduction="none")
    return torch.zeros(rows * width, dtype=token.dtype, device=token.device).index_put((keep,), token).view(rows, width)


def training_batch(sampled: Sampled, advantages: torch.Tensor, pad_id: int) -> Batch:
    """One training micro-batch: prompt + completion per row, right-padded, labels on the completion only
    (shifted, as data/batching.py's), and each row's advantage (N,)."""
    examples = [{"input_ids": prompt + tokens, "labels": [IGNORE_INDEX] * len(prompt) + tokens}
                for prompt, tokens in zip(sampled.prompts, sampled.tokens)]
    return {**collate_padded(examples, pad_id), ADVANTAGES: advantages.float()}


def silent_batch(prompt_batch: Batch) -> Batch:
    """A rank's filler micro-batch (its prompt batch is distributed.silent_copy's): the prompts alone, nothing
    trained, so the rank joins the step's collectives with no loss and no gradient."""
    rows = prompt_batch["input_ids"].shape[0]
    return {"input_ids": prompt_batch["input_ids"], "attention_mask": prompt_batch["attention_mask"],
            "labels": torch.full_like(prompt_batch["input_ids"], IGNORE_INDEX), ADVANTAGES: torch.zeros(rows)}


class GRPOObjective:
    """grpo as `train.step.ModelLoss` runs it (see the module docstring); its units are grpo_loss.loss_units'."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, rollout: Rollout, reference: Reference | None,
                 precision: Precision, parallel: Parallel | None = None) -> None:
        self.cfg, self.model, self.rollout, self.reference = cfg, model, rollout, reference
        self.precision, self.parallel = precision, parallel or Parallel()
        self.device = next(model.parameters()).device
        self.sampling = Sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        self.epsilon_high = cfg.grpo_epsilon if cfg.grpo_epsilon_high is None else cfg.grpo_epsilon_high
        self.reward_names = [name for name, _, _ in rollout.rewards]
        self.sum_names = (*ROLLOUT_SUMS, *(f"rewards/{name}" for name in self.reward_names), *TOKEN_SUMS)
        self.metric_names = self._metric_keys()
        self.sums: dict[bool, torch.Tensor | None] = {False: None, True: None}  # evaluation? -> sums

    # ---- the rollout ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt_batch: Batch, step: int | None) -> Sampled:
        """num_generations sampled completions of every prompt of `prompt_batch` at optimizer step `step`; one
        greedy completion each when `step` is None (evaluation)."""
        prompts = batch_prompts(prompt_batch)
        indices = prompt_batch[PROMPT_INDEX].tolist()
        group = 1 if step is None else self.cfg.num_generations
        rows = [(prompt, index, g) for prompt, index in zip(prompts, indices) for g in range(group)]
        seeds = [] if step is None else [sample_seed(self.cfg.seed, step, index, g) for _, index, g in rows]
        stops = self.rollout.stop_ids
        with eval_mode(self.model), self.precision.autocast(self.device):
            tokens = decode(self.model, [prompt for prompt, _, _ in rows],
                            [Sampling() if step is None else self.sampling] * len(rows),
                            max_new_tokens=[self.cfg.max_completion_length] * len(rows), stop_ids=set(),
                            pad_id=self.rollout.pad_id, seeds=seeds,
                            on_token=lambda row, token: token in stops)  # the stop token is kept, to be trained
        return Sampled([prompt for prompt, _, _ in rows], [index for _, index, _ in rows], tokens)

    def score(self, sampled: Sampled) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward (N,) of every completion and each reward's own values."""
        stops, tokenizer = self.rollout.stop_ids, self.rollout.tokenizer
        texts = [tokenizer.decode(t[:-1] if t and t[-1] in stops else t, skip_special_tokens=True)
                 for t in sampled.tokens]
        prompt_texts = {index: self.rollout.text(index) for index in set(sampled.indices)}
        return score(self.rollout.rewards, [prompt_texts[i] for i in sampled.indices], texts,
                     [self.rollout.prompts[i].row for i in sampled.indices])

    def prepare(self, micro_batches: list[Batch], step: int) -> list[Batch]:
        """This rank's training micro-batches of optimizer step `step`: each prompt batch's sampled completions
        with their advantages (a filler copy: `silent_batch`)."""
        started = time.perf_counter()
        sampled = [self.sample(batch, step) if (batch["labels"] != IGNORE_INDEX).any() else None
                   for batch in micro_batches]
        sampling_s = time.perf_counter() - started
        done = [s for s in sampled if s is not None]
        scored = [self.score(s) for s in done]
        rewards = torch.cat([total for total, _ in scored]) if done else torch.zeros(0)
        each = {name: torch.cat([values[name] for _, values in scored]) if done else torch.zeros(0)
                for name in self.reward_names}
        advantages = self._advantages(rewards)  # every rank calls it: scale_rewards batch gathers
        pieces = iter(advantages.split([len(s.tokens) for s in done]) if done else ())
        batches = [training_batch(s, next(pieces), self.rollout.pad_id) if s is not None else silent_batch(batch)
                   for s, batch in zip(sampled, micro_batches)]
        self._add_rollout(done, rewards, each, sampling_s, sum(b["input_ids"].numel() for b in batches))
        return batches

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages of this rank's rewards of the step; with scale_rewards batch the std is that
        of every rank's rewards of the step (gathered)."""
        group, scale = self.cfg.num_generations, self.cfg.scale_rewards
        if scale != "batch" or self.parallel.world == 1:
            return grpo_loss.group_advantages(rewards, group, scale) if rewards.numel() else rewards
        shares: list[Any] = [None] * self.parallel.world
        dist.all_gather_object(shares, rewards)
        start = sum(len(share) for share in shares[:self.parallel.rank])
        everyone = torch.cat(shares)
        return grpo_loss.group_advantages(everyone, group, scale)[start:start + len(rewards)] if everyone.numel() \
            else rewards

    # ---- the step (train.step.Objective) --------------------------------------------------------
    def units(self, batch: Batch) -> torch.Tensor:
        """The step's units in `batch` (grpo_loss.loss_units of its completions; a filler's rows count none); a
        prompt batch (evaluation): its prompts."""
        if PROMPT_INDEX in batch:
            return (batch["labels"] != IGNORE_INDEX).any(-1).sum()
        if ADVANTAGES not in batch:
            raise LorakitError("train.objective grpo samples its training batches from prompt rows (a `prompt` or "
                               "`messages` and the fields the rewards read), but the batches are SFT examples")
        mask = batch["labels"] != IGNORE_INDEX
        live = mask[mask.any(-1)]  # every sampled completion has a trained token (at least its stop token)
        return grpo_loss.loss_units(live, self.cfg.grpo_loss_type, self.cfg.max_completion_length).round().long()

    def loss_sum(self, model: ModelLoss, batch: Batch) -> torch.Tensor:
        """The summed GRPO loss of a training batch (on the device); for a prompt batch under no grad (evaluation)
        minus the summed reward of one greedy completion per prompt. Adds to the metric sums."""
        if PROMPT_INDEX in batch:
            return self._evaluate(batch)
        mask = batch["labels"] != IGNORE_INDEX  # (N, T)
        reference = None
        if self.reference is not None:  # before the policy's pass, as the preference objectives
            reference = self.reference.run(
                lambda call, head, b: completion_logps(call, head, b, self.cfg.temperature), batch)
        logps = completion_logps(model.call, model.head, batch, self.cfg.temperature)
        terms = grpo_loss.grpo_loss_terms(
            logps, None, reference, batch[ADVANTAGES], mask, epsilon_low=self.cfg.grpo_epsilon,
            epsilon_high=self.epsilon_high, beta=self.cfg.grpo_beta, loss_type=self.cfg.grpo_loss_type,
            max_completion_length=self.cfg.max_completion_length)
        self._add(terms.metric_sums(), evaluation=False)
        return grpo_loss.loss_sum(terms)

    def _evaluate(self, prompt_batch: Batch) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise LorakitError("a prompt batch reached the training step without its rollout (GRPOObjective.prepare)")
        live = (prompt_batch["labels"] != IGNORE_INDEX).any(-1)
        sampled = self.sample({key: value.cpu() for key, value in prompt_batch.items()}, None)
        rewards, each = self.score(sampled)
        keep = live.cpu()
        self._add_rollout([sampled], rewards * keep, {name: v * keep for name, v in each.items()}, 0.0, 0,
                          evaluation=True, count=int(keep.sum()))
        return -(rewards * keep).sum().to(self.device)

    # ---- metrics ---------------------------------------------------------------------------------
    def _add_rollout(self, sampled: list[Sampled], rewards: torch.Tensor, each: dict[str, torch.Tensor],
                     sampling_s: float, train_positions: int, evaluation: bool = False,
                     count: int | None = None) -> None:
        lengths = torch.tensor([len(t) for s in sampled for t in s.tokens], dtype=torch.float64)
        cut = [bool(t) and t[-1] not in self.rollout.stop_ids for s in sampled for t in s.tokens]
        group = 1 if evaluation else self.cfg.num_generations
        stds = rewards.double().view(-1, group).std(dim=1) if group > 1 and rewards.numel() else torch.zeros(0)
        values = {"completions": len(lengths) if count is None else count, "reward": rewards.double().sum(),
                  "group_std": stds.sum(), "groups": stds.numel(), "length": lengths.sum(), "clipped": sum(cut),
                  "sampled_tokens": lengths.sum(), "sampling_s": sampling_s, "train_positions": train_positions,
                  **{f"rewards/{name}": v.double().sum() for name, v in each.items()}}
        self._add(values, evaluation)

    def _add(self, values: dict[str, Any], evaluation: bool) -> None:
        row = torch.tensor([float(values.get(name, 0.0)) for name in self.sum_names], dtype=torch.float64)
        held = self.sums[evaluation]
        self.sums[evaluation] = row if held is None else held + row

    def take(self, evaluation: bool = False) -> torch.Tensor | None:
        """The metric sums since the last call (`sum_names`, float64), then reset (see `train.step.Objective`)."""
        sums, self.sums[evaluation] = self.sums[evaluation], None
        if sums is None or self.parallel.world == 1:
            return sums
        return sums.to(self.device)  # summed over the ranks by the loop's collective (NCCL: on the GPU)

    def restore(self, sums: list[float]) -> None:
        """Put back training sums that `take` gave (a resumed run continues its logging interval)."""
        self.sums[False] = torch.tensor(sums, dtype=torch.float64) if sums else None

    def _metric_keys(self) -> tuple[str, ...]:
        keys = ["reward", "reward_std", *(f"rewards/{name}/mean" for name in self.reward_names),
                "completions/mean_length", "completions/clipped_ratio"]
        keys += ["kl"] if self.cfg.grpo_beta > 0 else []
        return (*keys, *grpo_loss.CLIP_METRICS, "sampling_tokens_per_s", "train_tokens_per_s", "sampling_share")

    def means(self, sums: torch.Tensor, prefix: str = "", seconds: float | None = None) -> dict[str, float]:
        """{prefix + name: value} from `take()`'s sums (summed over the ranks): the module docstring's metrics;
        `seconds`: the wall time of the logging interval they cover (for the speeds and the sampling share)."""
        v = dict(zip(self.sum_names, sums.tolist()))
        n, tokens = v["completions"], v["tokens"]
        out = {}
        if n:
            out.update({"reward": v["reward"] / n, "completions/mean_length": v["length"] / n,
                        "completions/clipped_ratio": v["clipped"] / n})
            out.update({f"rewards/{name}/mean": v[f"rewards/{name}"] / n for name in self.reward_names})
        if v["groups"]:
            out["reward_std"] = v["group_std"] / v["groups"]
        if tokens:
            out.update({name: v[name] / tokens for name in TOKEN_SUMS[1:] if name != "kl" or self.cfg.grpo_beta > 0})
        sampling_s = v["sampling_s"] / self.parallel.world  # the ranks sample side by side
        if sampling_s > 0:
            out["sampling_tokens_per_s"] = v["sampled_tokens"] / sampling_s
        if seconds and sampling_s > 0:
            out["sampling_share"] = min(1.0, sampling_s / seconds)
            if seconds > sampling_s:
                out["train_tokens_per_s"] = v["train_positions"] / (seconds - sampling_s)
        return {prefix + key: out[key] for key in self.metric_names if key in out}

    def progress_text(self, record: dict[str, Any]) -> str:
        """The progress line's extra: the mean reward (and the KL with a penalty)."""
        text = f"reward {record.get('reward', float('nan')):.3f}"
        return text + (f" | kl {record['kl']:.4f}" if "kl" in record else "")

    def describe(self) -> list[str]:
        """What the run prints about its objective: sampling, rewards, loss, reference."""
        cfg = self.cfg
        sampling = f"temperature {cfg.temperature}" + (f", top_p {cfg.top_p}" if cfg.top_p < 1 else "") + (
            f", top_k {cfg.top_k}" if cfg.top_k else "")
        rewards = ", ".join(f"{name} (x{weight:g})" for name, weight, _ in self.rollout.rewards)
        loss = {"dapo": "the mean over the step's completion tokens", "bnpo": "the mean over the step's completion "
                "tokens", "grpo": "the mean over the step's completions of each one's token mean",
                "dr_grpo": f"the step's token sum / (completions x {cfg.max_completion_length})"}[cfg.grpo_loss_type]
        reference = (self.reference.describe() if self.reference is not None
                     else "no KL penalty (grpo_beta 0): no reference model")
        scale = {"group": "over its group's std", "batch": "over the std of the step's rewards",
                 "none": "not scaled (Dr. GRPO)"}[cfg.scale_rewards]
        return [f"objective grpo: {cfg.num_generations} completions per prompt ({sampling}; at most "
                f"{cfg.max_completion_length} tokens), rewards {rewards}, advantages (reward - group mean) {scale}; "
                f"loss {cfg.grpo_loss_type} ({loss}), clip [1 - {cfg.grpo_epsilon}, 1 + {self.epsilon_high}]; "
                f"{reference}"]


def check_parallel(parallel: Parallel) -> None:
    """GRPO decodes each rank's prompts to their own lengths: FSDP, which needs every rank in every pass, is out."""
    if parallel.kind == "fsdp":
        raise ConfigError("train.objective grpo: each rank samples its own prompts' completions, to their own "
                          "lengths, which FSDP's sharded passes cannot follow; set train.distributed: ddp")
