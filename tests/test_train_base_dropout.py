"""train.base_dropout: the base model's own dropout is a stated policy, proven off by a probe."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_fixtures import freeze_except, losses, run_tiny, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from lorakit.adapters import LoRA, apply
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig
from lorakit.train.base_dropout import describe, model_dropout, switched_off
from lorakit.train.setup import prepared


def tiny_gpt2_with_dropout():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))


def forward_twice(model):
    ids = torch.arange(3, 13)[None]
    outs = []
    with torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(model(input_ids=ids).logits)
    return outs


def test_off_is_the_default_and_makes_train_mode_deterministic_then_restores():
    model = apply(tiny_gpt2_with_dropout(), LoRA(r=2, dropout=0.1))
    assert TrainConfig().base_dropout == "off"
    assert describe(model, "off") == ("base dropout: off (the model's own dropout 0.1 is set to 0 while training; "
                                      "train.base_dropout: keep keeps it)")
    with prepared(model, TrainConfig(progress="none")):
        for module in model.modules():  # adapter dropout is the user's: off here only to compare
            if type(module).__module__.startswith("lorakit."):
                module.eval()
        first, second = forward_twice(model)
        assert torch.equal(first, second)
    model.train()
    assert {p for _, _, p in model_dropout(model)} == {0.1}  # restored after the run
    first, second = forward_twice(model)
    assert not torch.equal(first, second)


def test_keep_keeps_it_and_says_so():
    model = tiny_gpt2_with_dropout()
    assert describe(model, "keep") == "base dropout: kept at 0.1 (train.base_dropout: off turns it off)"
    with switched_off(model, "keep"):
        model.train()
        first, second = forward_twice(model)
        assert not torch.equal(first, second)
    assert describe(tiny_llama(), "off") == "base dropout: none in this model"


class HiddenDropout(nn.Module):
    """Dropout written into the forward: nothing lorakit could switch off."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=None):
        logits = self.head(F.dropout(self.embed(input_ids), 0.2, self.training))
        return type("Out", (), {"logits": logits})()


def test_a_dropout_out_of_reach_is_refused_not_claimed_off():
    with pytest.raises(ConfigError) as error:
        with switched_off(HiddenDropout(), "off"):
            pass
    assert str(error.value) == (
        "train.base_dropout: off, but HiddenDropout is still random in train mode after its dropout was set to 0 "
        "(a dropout lorakit cannot reach, or noise such as router jitter); set train.base_dropout: keep to train "
        "with it")


def test_with_dropout_off_the_seed_no_longer_changes_the_run(tmp_path):
    def run(name, seed):
        model = freeze_except(tiny_llama(seed=0, dropout=0.3), "q_proj", "v_proj")
        run_tiny(tmp_path / name, model=model, epochs=1, seed=seed)
        return losses(tmp_path / name)

    assert run("a", 1) == run("b", 2)
