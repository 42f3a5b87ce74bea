"""GRPO's math (train/grpo_loss.py) against a reference written here with plain Python loops over completions
and tokens in float64 (math, not torch): loss, hand-derived gradients and metrics for every loss type, with and
without the KL penalty, with the policy moved away from the sampler so the clip engages; accumulation over
micro-batches equals one batch; and the advantages for each scale."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from _tol import approx, tol
from lorakit.errors import ConfigError
from lorakit.train.grpo_loss import GRPO_LOSS_TYPES, group_advantages, grpo_loss_terms, loss_sum, loss_units

LENGTHS = [5, 3, 7, 1, 0, 6]  # completion tokens of each of 6 completions (one empty); width T = 8
WIDTH, MAX_LEN = 8, 10
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_case(seed: int = 0):
    """logps (N, T) with garbage (inf) on padding, the sampler's and reference's log-probs a few tenths away, and
    advantages of both signs."""
    generator = torch.Generator().manual_seed(seed)
    n = len(LENGTHS)
    mask = torch.zeros(n, WIDTH, dtype=torch.bool)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = True
    logps = -torch.rand(n, WIDTH, generator=generator) * 3
    old = logps + torch.randn(n, WIDTH, generator=generator) * 0.3
    ref = logps + torch.randn(n, WIDTH, generator=generator) * 0.5
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3])
    for values in (logps, old, ref):
        values.masked_fill_(~mask, float("-inf"))
    return logps, old, ref, advantages, mask


def reference(logps, old, ref, advantages, mask, *, beta, loss_type, correction=True):
    """(loss, d loss / d logps as nested lists, metrics) by loops, from the module docstring's formulas."""
    n = len(LENGTHS)
    lp, ol, rf = logps.double().tolist(), old.double().tolist(), ref.double().tolist()
    sums, grads, counts = [0.0] * n, [[0.0] * WIDTH for _ in range(n)], [0] * n
    kl_sum, low, high = 0.0, 0, 0
    per_seq_low, per_seq_high = [], []
    for i in range(n):
        a = float(advantages[i])
        seq_low = seq_high = 0
        for t in range(WIDTH):
            if not mask[i, t]:
                continue
            counts[i] += 1
            r = math.exp(lp[i][t] - ol[i][t])
            clipped = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
            surrogate = min(r * a, clipped * a)
            # d(-min(rA, clip(r)A))/dlogp: -rA when the unclipped term is the smaller (or they are equal)
            grad = -r * a if r * a <= clipped * a else 0.0
            delta = rf[i][t] - lp[i][t]
            k3 = math.exp(delta) - delta - 1
            kl = r * k3 if correction else k3
            kl_sum += kl
            sums[i] += -surrogate + beta * kl
            k3_grad = 1 - math.exp(delta)  # d k3 / d logp
            grads[i][t] = grad + beta * (r * k3 + r * k3_grad if correction else k3_grad)  # d r / d logp = r
            is_low, is_high = r < 1 - EPS_LOW and a < 0, r > 1 + EPS_HIGH and a > 0
            low, high = low + is_low, high + is_high
            seq_low, seq_high = seq_low + is_low, seq_high + is_high
        if counts[i]:
            per_seq_low.append(seq_low / counts[i])
            per_seq_high.append(seq_high / counts[i])
    tokens = sum(counts)
    if loss_type == "grpo":
        loss = sum(s / max(c, 1) for s, c in zip(sums, counts)) / n
        scale = [1 / (max(c, 1) * n) for c in counts]
    else:
        divisor = tokens if loss_type in ("bnpo", "dapo") else n * MAX_LEN
        loss, scale = sum(sums) / divisor, [1 / divisor] * n
    grads = [[g * scale[i] for g in row] for i, row in enumerate(grads)]
    metrics = {"kl": kl_sum / tokens, "clip_ratio/low_mean": low / tokens, "clip_ratio/high_mean": high / tokens,
               "clip_ratio/region_mean": (low + high) / tokens, "clip_ratio/low_min": min(per_seq_low),
               "clip_ratio/high_max": max(per_seq_high)}
    return loss, grads, metrics


def lorakit_loss(logps, old, ref, advantages, mask, *, beta, loss_type, correction=True):
    leaf = logps.clone().requires_grad_(True)
    terms = grpo_loss_terms(leaf, old, ref, advantages, mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                            beta=beta, loss_type=loss_type, max_completion_length=MAX_LEN,
                            kl_bias_correction=correction)
    loss = terms.reduce()
    loss.backward()
    return loss.detach(), leaf.grad, terms


@pytest.mark.parametrize("beta, correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_loss_gradients_and_metrics_equal_the_loop_reference(loss_type, beta, correction):
    case = make_case()
    expected, expected_grads, expected_metrics = reference(*case, beta=beta, loss_type=loss_type,
                                                           correction=correction)
    loss, grads, terms = lorakit_loss(*case, beta=beta, loss_type=loss_type, correction=correction)
    bound = tol(reduction=sum(LENGTHS))
    assert loss.item() == approx(expected, reduction=sum(LENGTHS))
    torch.testing.assert_close(grads, torch.tensor(expected_grads, dtype=torch.float32), **bound)
    assert torch.isfinite(grads).all() and not grads[~case[4]].any()  # padding (inf there) gets no gradient
    metrics = terms.metrics()
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        assert metrics[name] == approx(value, reduction=sum(LENGTHS)), name
    # the case engages the clip on both sides, so the clipped branch's zero gradient is checked too
    assert 0 < expected_metrics["clip_ratio/low_mean"] and 0 < expected_metrics["clip_ratio/high_mean"]


def test_the_loss_types_normalise_differently_on_this_case():
    """Guards the reference test: the four normalisations give four different numbers here (bnpo = dapo)."""
    case = make_case()
    losses = {kind: reference(*case, beta=0.0, loss_type=kind)[0] for kind in GRPO_LOSS_TYPES}
    assert losses["bnpo"] == losses["dapo"]
    assert len({round(losses[k], 6) for k in ("grpo", "dapo", "dr_grpo")}) == 3


def test_float64_inputs_stay_float64_and_match_the_reference_to_float64_rounding():
    logps, old, ref, advantages, mask = (t.double() if t.is_floating_point() else t for t in make_case(3))
    expected, expected_grads, _ = reference(logps, old, ref, advantages, mask, beta=0.1, loss_type="grpo")
    loss, grads, _ = lorakit_loss(logps, old, ref, advantages, mask, beta=0.1, loss_type="grpo")
    assert loss.dtype == torch.float64
    assert loss.item() == approx(expected, dtype=torch.float64, reduction=sum(LENGTHS))
    torch.testing.assert_close(grads, torch.tensor(expected_grads, dtype=torch.float64),
                               **tol(torch.float64, reduction=sum(LENGTHS)))


def test_without_old_logps_the_ratio_is_one_and_the_gradient_is_minus_the_advantage():
    logps, _, _, advantages, mask = make_case(1)
    for loss_type in GRPO_LOSS_TYPES:
        _, grads, terms = lorakit_loss(logps, None, None, advantages, mask, beta=0.0, loss_type=loss_type)
        units = loss_units(mask, loss_type, MAX_LEN)
        per_token = (-advantages[:, None] * mask).expand(-1, WIDTH)
        if loss_type == "grpo":
            per_token = per_token / mask.sum(1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(grads, per_token / units, **tol(reduction=sum(LENGTHS)))
        assert terms.kl is None and "kl" not in terms.metrics()
        assert terms.metrics()["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_micro_batches_summed_and_divided_by_the_steps_units_equal_one_batch(loss_type):
    """Split the 6 completions 2 + 1 + 3, each piece cut to its own padded width, as the loop would: the summed
    loss_sum over the summed loss_units is the one-batch loss, and so are the gradients."""
    logps, old, ref, advantages, mask = make_case(2)
    options = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.04, loss_type=loss_type,
                   max_completion_length=MAX_LEN)
    whole_leaf = logps.clone().requires_grad_(True)
    whole = grpo_loss_terms(whole_leaf, old, ref, advantages, mask, **options).reduce()
    whole.backward()

    leaf = logps.clone().requires_grad_(True)
    pieces = [slice(0, 2), slice(2, 3), slice(3, 6)]
    widths = [max(max(LENGTHS[p]), 1) for p in pieces]
    units = sum(loss_units(mask[p, :w], loss_type, MAX_LEN) for p, w in zip(pieces, widths))  # before backward
    total = torch.zeros(())
    for piece, width in zip(pieces, widths):
        terms = grpo_loss_terms(leaf[piece, :width], old[piece, :width], ref[piece, :width], advantages[piece],
                                mask[piece, :width], **options)
        piece_loss = loss_sum(terms, mask[piece, :width], loss_type, MAX_LEN) / units
        piece_loss.backward()
        total += piece_loss.detach()
    assert total.item() == approx(whole.item(), reduction=sum(LENGTHS))
    torch.testing.assert_close(leaf.grad, whole_leaf.grad, **tol(reduction=sum(LENGTHS)))
    assert leaf.grad.abs().sum() > 0


def test_metric_sums_add_over_micro_batches():
    logps, old, ref, advantages, mask = make_case(0)
    options = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    whole = grpo_loss_terms(logps, old, ref, advantages, mask, **options).metric_sums()
    halves = [grpo_loss_terms(logps[p], old[p], ref[p], advantages[p], mask[p], **options).metric_sums()
              for p in (slice(0, 3), slice(3, 6))]
    assert whole.keys() == {"tokens", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    for name, value in whole.items():
        assert (halves[0][name] + halves[1][name]).item() == approx(value.item(), reduction=sum(LENGTHS)), name
    assert whole["tokens"].item() == sum(LENGTHS)


def test_loss_units_count_tokens_completions_or_completions_times_max_length():
    mask = make_case()[4]
    assert loss_units(mask, "dapo").item() == loss_units(mask, "bnpo").item() == sum(LENGTHS)
    assert loss_units(mask, "grpo").item() == len(LENGTHS)
    assert loss_units(mask, "dr_grpo", MAX_LEN).item() == len(LENGTHS) * MAX_LEN


def test_errors():
    logps, old, ref, advantages, mask = make_case()
    with pytest.raises(ConfigError, match="^loss_type 'ppo' is not one of grpo, bnpo, dr_grpo, dapo$"):
        grpo_loss_terms(logps, old, ref, advantages, mask, loss_type="ppo")
    with pytest.raises(ConfigError, match="^loss_type 'dr_grpo' divides by max_completion_length, which is not set$"):
        loss_units(mask, "dr_grpo")
    with pytest.raises(ValueError, match=r"^beta 0.1 needs the reference's log-probs \(ref_logps\)$"):
        grpo_loss_terms(logps, old, None, advantages, mask, beta=0.1)
    with pytest.raises(ValueError, match="must share one"):
        grpo_loss_terms(logps, old[:, :4], ref, advantages, mask)
    with pytest.raises(ConfigError, match="^advantage scale 'std' is not one of group, batch, none$"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match=r"^rewards of shape \(5,\) do not split into groups of 2$"):
        group_advantages(torch.zeros(5), 2)


# ----------------------------------------------------------------------------- advantages


REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0]  # three prompts, G = 4 (one all equal)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_centre_on_the_group_mean_and_scale_by_the_chosen_std(scale):
    expected = []
    for g in range(0, len(REWARDS), 4):
        group = REWARDS[g:g + 4]
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(REWARDS), "none": None}[scale]
        expected += [(r - statistics.fmean(group)) / (std + 1e-4) if std is not None else r - statistics.fmean(group)
                     for r in group]
    result = group_advantages(torch.tensor(REWARDS), 4, scale)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float32), **tol(reduction=4))
    assert result[4:8].abs().max() == 0.0  # a group whose completions all scored alike teaches nothing


def test_a_group_of_one_has_zero_advantage():
    assert group_advantages(torch.tensor([3.0, -1.0]), 1).tolist() == [0.0, 0.0]
