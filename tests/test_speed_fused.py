"""Shared-input LoRA down-projections (lorakit.adapters.fused) against the plain LoRALayer path."""
from __future__ import annotations

import torch

from conftest import tiny_gpt2, tiny_llama
from lorakit.adapters import LoRA, apply
from lorakit.adapters.fused import fuse_shared_inputs, unfuse
from lorakit.train.precision import PRECISIONS
from lorakit.train.step import make_loss_sum
from test_speed_loss import packed_batch


def adapted(dropout: float = 0.0) -> torch.nn.Module:
    model = apply(tiny_llama(seed=4), LoRA(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def loss_and_grads(model, batch, precision="fp32"):
    model.zero_grad(set_to_none=True)
    loss = make_loss_sum(model, torch.device("cpu"), PRECISIONS[precision])(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_down_projections_give_the_plain_loss_and_gradients():
    model = adapted()
    batch = packed_batch(seed=1)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert fuse_shared_inputs(model) == 2 * 2  # (q, k, v) and (gate, up) in each of 2 layers
    fused_loss, fused_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    unfuse(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_weight_update_is_seen_on_the_same_input():
    model = adapted()
    fuse_shared_inputs(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 32)
    before = attention.k_proj(x)
    with torch.no_grad():
        attention.k_proj.lora_A.weight.add_(0.5)  # an optimizer step between two calls on one tensor
    after = attention.k_proj(x)
    unfuse(model)
    torch.testing.assert_close(after, attention.k_proj(x))
    assert not torch.allclose(before, after)


def test_layers_with_dropout_or_other_names_are_left_alone():
    assert fuse_shared_inputs(adapted(dropout=0.1)) == 0
    assert fuse_shared_inputs(apply(tiny_gpt2(), LoRA(r=2, alpha=4, targets="all-linear"))) == 0  # c_attn is one layer
