"""Parity with TRL's DPOTrainer (the oracle, installed like peft): loss, LoRA gradients and logged metrics.

One tiny Llama with a peft LoRA, three preference rows tokenized and collated by TRL itself, and
TRL's own `compute_loss` on that batch; the same adapter is loaded into lorakit (peft folder ->
`load_adapter`) and the same batch, with its completion mask turned into lorakit's shifted labels,
goes through lorakit's loss. Both run in fp32 on the CPU, so they agree to fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from _tiny import tiny_tokenizer
from _tol import TINY, approx, tol
from conftest import tiny_llama
from lorakit.adapters import apply_from_folder, load_adapter
from lorakit.adapters.config import LoRA
from lorakit.labels import IGNORE_INDEX
from lorakit.train import TrainConfig
from lorakit.train.precision import PRECISIONS
from lorakit.train.preference import AdaptersOff, PreferenceObjective, WeightCopy
from lorakit.train.step import make_loss_sum

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": "Question: what is two plus two? Answer:", "chosen": " four.", "rejected": " the quick brown fox"},
        {"prompt": "Hello world.", "chosen": " The quick brown fox jumps.", "rejected": " terminal"},
        {"prompt": "I want you to act as", "chosen": " a Linux terminal.", "rejected": " a dog."}]
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def base_model():
    return tiny_llama(0, vocab_size=len(tiny_tokenizer()))


@torch.no_grad()
def perturb_lora_(model, seed: int) -> None:
    """Move the peft adapter's weights (B included) away from their init, so the policy differs from its reference."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if ".default." in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def trl_trainer(tmp_path, model, loss_type: str, beta: float, **config):
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                         use_cpu=True, bf16=False, fp16=False, max_length=None, per_device_train_batch_size=len(ROWS))
    return trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                          processing_class=tiny_tokenizer(), **config)


def lorakit_batch(trl_batch: dict) -> dict:
    """TRL's collated batch (rows: chosen then rejected, completion_mask) as lorakit's preference batch."""
    ids, completion = trl_batch["input_ids"], trl_batch["completion_mask"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)  # target of position t is t+1
    return {"input_ids": ids, "labels": labels, "attention_mask": trl_batch["attention_mask"], "pairs": len(ROWS)}


def trl_side(trainer):
    """TRL's loss, LoRA gradients (by lorakit name) and metrics on its own collated batch of ROWS."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name.removeprefix("base_model.model.").replace(".default", ""): p.grad.clone()
             for name, p in trainer.model.named_parameters() if ".default." in name}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return batch, loss.detach(), grads, metrics


def lorakit_side(model, cfg: TrainConfig, reference, batch: dict, chunked: bool = False):
    """lorakit's mean loss per pair, LoRA gradients and metrics on `batch` (`chunked`: log-probs from the head at
    the trained positions only)."""
    objective = PreferenceObjective(cfg, reference)
    model.train()
    model.zero_grad()
    model_loss = make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"], chunked=chunked, objective=objective)
    assert (model_loss.head is not None) == chunked
    loss = model_loss(batch) / len(ROWS)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, objective.means(objective.take())


def assert_same(trl_result, ours) -> None:
    _, trl_loss, trl_grads, trl_metrics = trl_result
    loss, grads, metrics = ours
    assert loss.item() == approx(trl_loss.item(), reduction=TINY)
    assert grads.keys() == trl_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name, grad in grads.items():  # the same sums, reordered by another kernel: a TINY reduction
        torch.testing.assert_close(grad, trl_grads[name], msg=name, **tol(reduction=TINY))
    for name in METRICS:
        assert metrics[name] == approx(trl_metrics[name], reduction=TINY, scale=10.0), name  # logps are ~-50
    assert metrics["rewards/chosen"] != 0.0 and metrics["rewards/rejected"] != 0.0  # the policy left its reference


@pytest.mark.parametrize("loss_type, objective, chunked", [("sigmoid", "dpo", False), ("ipo", "ipo", False),
                                                           ("sigmoid", "dpo", True)])
def test_loss_gradients_and_metrics_equal_trl_with_the_adapter_switched_off_as_reference(tmp_path, loss_type,
                                                                                       objective, chunked):
    """A fresh adapter: TRL's reference is the peft model with its adapter disabled, lorakit's `AdaptersOff`."""
    trainer = trl_trainer(tmp_path, base_model(), loss_type, beta=0.5, peft_config=peft.LoraConfig(**LORA))
    perturb_lora_(trainer.model, seed=1)
    theirs = trl_side(trainer)
    trainer.model.save_pretrained(tmp_path / "adapter")

    model = load_adapter(base_model(), tmp_path / "adapter")
    cfg = TrainConfig(objective=objective, beta=0.5)
    assert_same(theirs, lorakit_side(model, cfg, AdaptersOff(model, fast=chunked), lorakit_batch(theirs[0]), chunked))


def test_an_adapter_trained_further_has_its_initial_copy_as_reference_as_in_trl(tmp_path):
    """Starting from a trained adapter (the SFT-then-DPO pipeline): TRL copies it into a frozen "ref" adapter,
    lorakit keeps a `WeightCopy` of it (model.init_adapter); then both policies move away from it."""
    sft = peft.get_peft_model(base_model(), peft.LoraConfig(**LORA))
    perturb_lora_(sft, seed=2)
    sft.save_pretrained(tmp_path / "sft")
    trainer = trl_trainer(tmp_path, peft.PeftModel.from_pretrained(base_model(), tmp_path / "sft", is_trainable=True),
                          "sigmoid", beta=0.5)
    perturb_lora_(trainer.model, seed=3)  # the policy after some steps; TRL's "ref" adapter keeps the SFT weights
    theirs = trl_side(trainer)
    trainer.model.save_pretrained(tmp_path / "policy")

    model = apply_from_folder(base_model(), LoRA(r=4, alpha=8, targets="all-linear"), tmp_path / "sft")
    reference = WeightCopy(model)  # made at the start of the run, from the SFT weights
    policy = load_adapter(base_model(), tmp_path / "policy")
    with torch.no_grad():  # the same steps taken on lorakit's side
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(policy.get_parameter(name))
    assert_same(theirs, lorakit_side(model, TrainConfig(objective="dpo", beta=0.5), reference,
                                     lorakit_batch(theirs[0])))
