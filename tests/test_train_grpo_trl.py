"""Parity with TRL's GRPOTrainer (the oracle, installed like peft) on the same tensors.

The loss: TRL's own `compute_loss` runs on a minimal inputs dict (prompt and completion ids and masks, the
advantages, the sampler's and the reference's per-token log-probs) with its per-token log-prob pass replaced
by one that returns a fixed leaf tensor, so TRL's loss, its gradient w.r.t. that tensor and its logged
metrics (kl, clip ratios) are compared with lorakit's on the same numbers, for every loss type with and
without the KL penalty. The advantages: TRL computes them inline in `_generate_and_score_completions` (not a
separable function), so that method runs on a tiny Llama, with reward functions returning fixed values, and
its advantages are compared with `score` + `group_advantages` for each reward scale.
"""
from __future__ import annotations

import pytest
import torch

from _tiny import tiny_tokenizer
from _tol import approx, tol
from conftest import tiny_llama
from lorakit.train.grpo_loss import GRPO_LOSS_TYPES, group_advantages, grpo_loss_terms
from lorakit.train.rewards import Reward, score
from test_train_grpo_loss import EPS_HIGH, EPS_LOW, LENGTHS, MAX_LEN, make_case

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

GROUP = 3  # 6 completions: 2 prompts x 3
METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
           "clip_ratio/high_max")
TOKENS = sum(LENGTHS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama on disk: with beta > 0 TRL loads its reference model from the policy's path."""
    path = tmp_path_factory.mktemp("grpo_trl") / "model"
    tiny_llama(0, vocab_size=len(tiny_tokenizer())).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def trl_trainer(model_dir, tmp_path, reward_funcs, **config):
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
                          per_device_train_batch_size=len(LENGTHS), num_generations=GROUP,
                          max_completion_length=MAX_LEN, logging_steps=1, **config)
    dataset = datasets.Dataset.from_list([{"prompt": "Question: what is two plus two? Answer:"},
                                          {"prompt": "Hello world."}])
    return trl.GRPOTrainer(model=str(model_dir), reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                           processing_class=tiny_tokenizer())


def zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def trl_loss(trainer, logps, old, ref, advantages, mask):
    """TRL's loss, its gradient w.r.t. the per-token log-probs, and its logged metrics, on these tensors."""
    leaf = logps.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (leaf, torch.zeros_like(leaf), None)
    trainer.current_gradient_accumulation_steps = 1  # one micro-batch per step, as Trainer's loop sets it
    trainer.model.train()
    n = mask.shape[0]
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), leaf.grad, metrics


@pytest.mark.parametrize("beta, correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_loss_gradient_and_metrics_equal_trl(model_dir, tmp_path, loss_type, beta, correction):
    """correction: TRL's use_bias_correction_kl (its default True), lorakit's kl_bias_correction."""
    logps, old, ref, advantages, mask = make_case()
    # TRL multiplies padding by the mask (inf * 0 is nan): give it finite padding, ignored by both
    logps, old, ref = (t.masked_fill(~mask, -1.0) for t in (logps, old, ref))
    trainer = trl_trainer(model_dir, tmp_path, zero_reward, beta=beta, loss_type=loss_type, epsilon=EPS_LOW,
                          epsilon_high=EPS_HIGH, use_bias_correction_kl=correction)
    theirs, their_grads, their_metrics = trl_loss(trainer, logps, old, ref if beta else None, advantages, mask)

    leaf = logps.clone().requires_grad_(True)
    terms = grpo_loss_terms(leaf, old, ref if beta else None, advantages, mask, epsilon_low=EPS_LOW,
                            epsilon_high=EPS_HIGH, beta=beta, loss_type=loss_type, max_completion_length=MAX_LEN,
                            kl_bias_correction=correction)
    ours = terms.reduce()
    ours.backward()

    assert ours.item() == approx(theirs.item(), reduction=TOKENS)
    torch.testing.assert_close(leaf.grad, their_grads, **tol(reduction=TOKENS))
    metrics = terms.metrics()
    names = METRICS if beta else METRICS[1:]
    assert ("kl" in their_metrics) == bool(beta) and ("kl" in metrics) == bool(beta)
    for name in names:
        assert metrics[name] == approx(their_metrics[name], reduction=TOKENS), name
    assert their_metrics["clip_ratio/low_mean"] > 0 and their_metrics["clip_ratio/high_mean"] > 0


FIXED = {"right": [1.0, 0.0, 1.0, 0.0, 0.0, 0.0], "short": [0.0, -0.5, -1.0, 0.25, 0.5, -0.25]}
WEIGHTS = {"right": 1.0, "short": 0.5}


def fixed_trl_reward(name):
    def reward(prompts, completions, **kwargs):
        assert len(completions) == len(FIXED[name])
        return FIXED[name]
    reward.__name__ = name
    return reward


def fixed_reward(name) -> Reward:
    return Reward(name, lambda prompts, completions, rows: FIXED[name])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_weighted_rewards_and_group_advantages_equal_trl(model_dir, tmp_path, scale):
    trainer = trl_trainer(model_dir, tmp_path, [fixed_trl_reward(name) for name in FIXED], scale_rewards=scale,
                          reward_weights=[WEIGHTS[name] for name in FIXED])
    trainer.model.train()
    prompts = [row["prompt"] for row in trainer.train_dataset for _ in range(GROUP)]  # each prompt G times in a row
    torch.manual_seed(0)
    theirs = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])["advantages"]

    total, each = score([(name, WEIGHTS[name], fixed_reward(name)) for name in FIXED], prompts,
                        ["completion"] * len(prompts), [{}] * len(prompts))
    assert each["short"].tolist() == FIXED["short"]
    ours = group_advantages(total, GROUP, scale)
    torch.testing.assert_close(ours, theirs, **tol(reduction=GROUP))
    assert ours.abs().sum() > 0
