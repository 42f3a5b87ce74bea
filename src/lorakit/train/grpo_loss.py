"""The math of GRPO: group-relative advantages and the clipped policy objective, with its four normalisations.

For each prompt the rollout samples a group of G completions o_1..o_G; completion i gets reward R_i and
token t of it the per-token log-probs logp_{i,t} (the policy being trained), old_{i,t} (the policy that
sampled it) and ref_{i,t} (the reference, for the KL penalty).

Advantages (`group_advantages`), with mean and std taken over the prompt's group (std: Bessel-corrected):

    group   A_i = (R_i - mean_group R) / (std_group R + 1e-4)      GRPO (Shao et al. 2024, DeepSeekMath), TRL
    batch   A_i = (R_i - mean_group R) / (std_batch R + 1e-4)      Lite PPO (Liu et al. 2025, "Tricks or Traps?")
    none    A_i =  R_i - mean_group R                              Dr. GRPO (Liu et al. 2025, "Understanding
                                                                   R1-Zero-Like Training"): no difficulty bias

Per-token loss (`grpo_loss_terms`), with ratio r = exp(logp - old), the clip range asymmetric as DAPO's
"clip-higher" (Yu et al. 2025: epsilon_low 0.2, epsilon_high 0.28 lets rare tokens grow) and the KL
penalty's k3 estimator (Schulman 2020, "Approximating KL divergence"; TRL's), always >= 0:

    l_{i,t} = -min(r A_i, clip(r, 1 - epsilon_low, 1 + epsilon_high) A_i) + beta KL_{i,t}
    k3_{i,t} = exp(ref - logp) - (ref - logp) - 1
    KL_{i,t} = r k3_{i,t}   (kl_bias_correction, the default, as TRL 1.16's use_bias_correction_kl)
    KL_{i,t} = k3_{i,t}     (kl_bias_correction=False: GRPO's original penalty, DeepSeekMath)

The completions were sampled from the old policy, so the plain k3's mean estimates KL(pi || pi_ref) only
on-policy, and even there its expected gradient, E[(1 - exp(ref - logp)) grad logp], is that of the forward
KL(pi_ref || pi), not of the penalised reverse one. Weighting by r (DeepSeek-V3.2's unbiased KL estimate)
makes the mean unbiased for KL(pi || pi_ref) off-policy too, and adds the missing E[k3 grad logp], so the
expected gradient is that of KL(pi || pi_ref). r's gradient counts even where r = 1: the penalty's gradient is
beta r (k3 + 1 - exp(ref - logp)) grad logp.

With old = logp detached (one optimisation step per rollout) r = 1 and the policy term's gradient is
-A_i grad logp.

Normalisation: how the per-token losses of a batch of N completions of |o_i| tokens become one number
(TRL 1.16's loss types; L_max = max_completion_length):

    grpo     (1/N) sum_i (1/|o_i|) sum_t l_{i,t}       per sequence: each completion's mean, then the mean over
                                                       completions (DeepSeekMath); a long completion's tokens
                                                       weigh less, which favours long wrong answers
    bnpo     sum_i sum_t l_{i,t} / sum_i |o_i|          per token: the mean over all completion tokens
    dapo     sum_i sum_t l_{i,t} / sum_i |o_i|          per token (DAPO's token-level loss), the default
    dr_grpo  sum_i sum_t l_{i,t} / (N L_max)            per token over a constant (Dr. GRPO): no length bias
                                                       and no dependence on the batch's lengths

An optimizer step may be split into micro-batches (accumulation, ranks, out-of-memory halving). The step's
loss is the formula above over *all* its completions: `loss_units` counts each micro-batch's units (tokens,
completions, or completions * L_max), the loop sums them over the step before any backward pass, and divides
the summed `loss_sum` of the micro-batches by that total, so the gradient does not depend on the split
(train/step.py's rule for SFT). For grpo, dr_grpo and dapo this equals TRL's loss on any split into equal
micro-batches. TRL's bnpo divides by each micro-batch's own tokens and averages the micro-batches, so its
gradient depends on the split (TRL added dapo to fix that); here bnpo is the per-token mean over the whole
step and so the same as dapo, kept as a name so that TRL configs carry over. On one micro-batch both equal
TRL's.

Logged metrics (TRL's names and meanings, means over completion tokens): kl (KL_{i,t} as above, when a
reference is given), clip_ratio/low_mean (tokens with A < 0 whose ratio fell below 1 - epsilon_low: the clip
holds them), clip_ratio/high_mean (A > 0 and ratio above 1 + epsilon_high), clip_ratio/region_mean (either),
and per completion the extremes clip_ratio/low_min and clip_ratio/high_max.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import ConfigError

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
STD_EPSILON = 1e-4  # added to the std before dividing, as TRL
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(P*G,) advantages from (P*G,) rewards in groups of `group_size` consecutive completions (completions
    g*G..g*G+G-1 answer prompt g): reward minus its group's mean, divided by the group's std + 1e-4 ("group"),
    the whole batch's std + 1e-4 ("batch"), or not divided ("none"). A std of one value counts as 0, as TRL."""
    _check_choice(scale, "advantage scale", ADVANTAGE_SCALES)
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    groups = rewards.view(-1, group_size)  # (P, G)
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0], dtype=rewards.dtype)
        std = std.repeat_interleave(group_size)
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + STD_EPSILON)


@dataclass(frozen=True)
class GRPOTerms:
    """One micro-batch's per-token GRPO losses and what its metrics need; tensors (N, T) are 0 (False) outside
    the completion tokens."""

    per_token: torch.Tensor  # (N, T) l_{i,t}, with the KL penalty when beta > 0
    kl: torch.Tensor | None  # (N, T) KL_{i,t} to the reference (k3, times r with kl_bias_correction); None without
    #                          ref_logps
    low_clipped: torch.Tensor  # (N, T) bool: A < 0 and ratio < 1 - epsilon_low
    high_clipped: torch.Tensor  # (N, T) bool: A > 0 and ratio > 1 + epsilon_high
    mask: torch.Tensor  # (N, T) 1.0 on completion tokens, in the loss's dtype
    loss_type: str
    max_completion_length: int | None

    def reduce(self) -> torch.Tensor:
        """This micro-batch's loss alone: its `loss_sum` over its `loss_units` (TRL's loss on one micro-batch)."""
        units = loss_units(self.mask, self.loss_type, self.max_completion_length)
        return loss_sum(self, self.mask, self.loss_type, self.max_completion_length) / units.clamp(min=1)

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Sums over completion tokens (0-dim, detached) for the logged means: "tokens" (the count to divide
        by), "kl" (when a reference was given) and the clip ratios' CLIP_METRICS. Sum them over a step's
        micro-batches (and ranks), then divide each by the summed "tokens"."""
        region = self.low_clipped | self.high_clipped
        sums = {"tokens": self.mask.sum().detach()}
        if self.kl is not None:
            sums["kl"] = self.kl.detach().sum()
        for name, clipped in zip(CLIP_METRICS, (self.low_clipped, self.high_clipped, region)):
            sums[name] = clipped.sum().to(self.mask.dtype)
        return sums

    def metrics(self) -> dict[str, float]:
        """TRL's logged values for this micro-batch alone: the token means of `metric_sums`, and the smallest
        per-completion low-clip fraction (clip_ratio/low_min) and largest high-clip one (clip_ratio/high_max)
        over completions with at least one token."""
        sums = self.metric_sums()
        tokens = sums.pop("tokens").clamp(min=1)
        values = {name: (value / tokens).item() for name, value in sums.items()}
        lengths = self.mask.sum(dim=1)
        present = lengths > 0
        low = self.low_clipped.sum(dim=1)[present] / lengths[present]
        high = self.high_clipped.sum(dim=1)[present] / lengths[present]
        values["clip_ratio/low_min"] = low.min().item() if low.numel() else float("nan")
        values["clip_ratio/high_max"] = high.max().item() if high.numel() else float("nan")
        return values


def grpo_loss_terms(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, *, epsilon_low: float = 0.2,
                    epsilon_high: float = 0.2, beta: float = 0.0, loss_type: str = "dapo",
                    max_completion_length: int | None = None, kl_bias_correction: bool = True) -> GRPOTerms:
    """The per-token clipped policy loss (module docstring) of N completions.

    logps (N, T): the policy's log-probs of the completion tokens, with grad; old_logps (N, T) those of the
    policy that sampled them (None: logps detached, one optimisation step per rollout); ref_logps (N, T) the
    reference's (needed when beta > 0; when given with beta 0, the KL is only logged); advantages (N,); mask
    (N, T) 1 (True) on completion tokens; kl_bias_correction: weight the KL by r (module docstring). Values
    outside the mask are ignored, even inf or nan. Computed in fp32 at least (fp64 stays fp64)."""
    _check_choice(loss_type, "loss_type", GRPO_LOSS_TYPES)
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ConfigError("loss_type 'dr_grpo' divides by max_completion_length, which is not set")
    if beta and ref_logps is None:
        raise ValueError(f"beta {beta} needs the reference's log-probs (ref_logps)")
    shapes = [tuple(t.shape) for t in (logps, old_logps, ref_logps, mask) if t is not None]
    if len(set(shapes)) != 1 or logps.dim() != 2 or tuple(advantages.shape) != (logps.shape[0],):
        raise ValueError(f"logps/old_logps/ref_logps/mask must share one (N, T) shape and advantages be (N,); "
                         f"got {shapes} and {tuple(advantages.shape)}")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    keep = mask.bool()

    def on_tokens(values: torch.Tensor) -> torch.Tensor:  # 0 outside the mask, so no inf or nan leaks
        return torch.where(keep, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))

    logps = on_tokens(logps)
    old = logps.detach() if old_logps is None else on_tokens(old_logps)
    advantage = advantages.to(dtype).unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logps - old)  # (N, T)
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
    kl = None
    if ref_logps is not None:
        to_ref = on_tokens(ref_logps) - logps
        kl = (torch.exp(to_ref) - to_ref - 1) * keep  # k3, 0 where mask is 0 (both terms are 0 there)
        if kl_bias_correction:
            kl = kl * ratio
        if beta:
            per_token = per_token + beta * kl
    low = keep & (ratio < 1 - epsilon_low) & (advantage < 0)
    high = keep & (ratio > 1 + epsilon_high) & (advantage > 0)
    return GRPOTerms(per_token=per_token * keep, kl=kl, low_clipped=low.detach(), high_clipped=high.detach(),
                     mask=keep.to(dtype), loss_type=loss_type, max_completion_length=max_completion_length)


def loss_units(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> torch.Tensor:
    """The units (0-dim float) one micro-batch with completion `mask` (N, T) adds to its step's divisor:
    completion tokens (bnpo, dapo), completions (grpo), completions * max_completion_length (dr_grpo)."""
    _check_choice(loss_type, "loss_type", GRPO_LOSS_TYPES)
    if loss_type in ("bnpo", "dapo"):
        return mask.sum().float()
    if loss_type == "grpo":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    if not max_completion_length:
        raise ConfigError("loss_type 'dr_grpo' divides by max_completion_length, which is not set")
    return torch.tensor(float(mask.shape[0] * max_completion_length), device=mask.device)


def loss_sum(terms: GRPOTerms, mask: torch.Tensor | None = None, loss_type: str | None = None,
             max_completion_length: int | None = None) -> torch.Tensor:
    """The micro-batch's summed loss (0-dim, with grad) whose division by the step's summed `loss_units` gives
    `loss_type`'s loss over the step: each completion's token mean summed over completions (grpo), the tokens'
    losses summed (bnpo, dapo, dr_grpo). mask, loss_type, max_completion_length default to those of `terms`."""
    mask = terms.mask if mask is None else mask
    loss_type = terms.loss_type if loss_type is None else loss_type
    _check_choice(loss_type, "loss_type", GRPO_LOSS_TYPES)
    if loss_type == "grpo":  # an empty completion counts in the mean with loss 0, as TRL (clamp(min=1))
        return (terms.per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(terms.per_token.dtype)).sum()
    if loss_type == "dr_grpo" and not (max_completion_length or terms.max_completion_length):
        raise ConfigError("loss_type 'dr_grpo' divides by max_completion_length, which is not set")
    return terms.per_token.sum()
