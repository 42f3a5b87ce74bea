"""Mixture of LoRA experts: k=1 equals plain LoRA, starts equal to base, routing, the
load-balancing loss (added by the training loop and logged), save/load, errors, training."""
from __future__ import annotations

import json

import pytest
import torch
from _tol import TINY, approx, tol
from conftest import TINY_MODELS, tiny_batch, tiny_llama
from _method_runs import make_workdir, run_method

import lorakit
from lorakit.adapters import (LoRA, MoLE, apply, load_adapter, merge, save_adapter, trainable_parameters,
                              unload)
from lorakit.adapters.layers import layer_kind
from lorakit.adapters.mole import MoLELayer, balance_loss, param_count
from lorakit.adapters.state import lora_layers
from lorakit.errors import AdapterError, ConfigError


def _perturb(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _mole_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLELayer)]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_one_expert_equals_plain_lora_exactly(arch):
    ids = tiny_batch()
    lora = apply(TINY_MODELS[arch](), LoRA(r=4, alpha=8))
    _perturb(lora)
    mole = apply(TINY_MODELS[arch](), MoLE(r=4, alpha=8, num_experts=1, router_init="normal"))
    with torch.no_grad():
        for (path, lora_layer), (mole_path, mole_layer) in zip(lora_layers(lora), _mole_layers(mole), strict=True):
            assert path == mole_path
            mole_layer.lora_A[0].copy_(lora_layer.lora_A.weight)
            mole_layer.lora_B[0].copy_(lora_layer.lora_B.weight)
    assert torch.equal(mole(input_ids=ids).logits, lora(input_ids=ids).logits)


@pytest.mark.parametrize("top_k", [None, 2])
def test_starts_equal_to_base_and_counts_parameters(top_k):
    ids = tiny_batch()
    base = tiny_llama()
    model = apply(tiny_llama(), MoLE(r=2, num_experts=3, top_k=top_k, router_init="normal"))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    expected = sum(param_count(*layer_kind(m._base).dims(m.weight), 2, 3) for _, m in _mole_layers(model))
    assert len(_mole_layers(model)) == 14  # 7 linear layers in each of 2 decoder layers
    assert trainable_parameters(model) == (expected, sum(p.numel() for p in base.parameters()) + expected)


def test_top_k_gates_are_renormalised_over_the_chosen_experts():
    model = apply(tiny_llama(), MoLE(r=2, num_experts=4, top_k=2, router_init="normal"))
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, 32)
    gates = layer.gates(x)  # (3, 5, 4)
    probs = torch.softmax(layer.router(x), dim=-1)
    top = probs.topk(2, dim=-1)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True),
                               **tol(reduction=4))
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 5), **tol(reduction=4))


def test_balance_loss_is_one_when_balanced_and_k_when_collapsed():
    uniform = torch.full((6, 3), 1 / 3)
    one_each = torch.eye(3).repeat(2, 1)
    assert balance_loss(uniform, one_each).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]]).repeat(6, 1)
    assert balance_loss(collapsed, collapsed).item() == pytest.approx(3.0)


def test_auxiliary_loss_is_weighted_and_consumed_once():
    model = apply(tiny_llama(), MoLE(r=2, num_experts=2, aux_loss_weight=0.5, router_init="normal"))
    model(input_ids=tiny_batch())
    layer = model.model.layers[1].self_attn.q_proj
    recorded = layer.last_balance_loss
    assert torch.equal(layer.auxiliary_loss(), 0.5 * recorded)
    assert layer.auxiliary_loss() is None  # consumed: a later forward records a new one


def test_save_load_round_trip_merge_refused_unload(tmp_path):
    ids = tiny_batch()
    model = apply(tiny_llama(), MoLE(r=2, num_experts=3, top_k=2, targets=["q_proj", "v_proj"]))
    _perturb(model)
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lorakit_method"] == "mole" and config["config"]["num_experts"] == 3
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    with pytest.raises(AdapterError, match="a mixture of LoRA experts cannot be merged"):
        merge(loaded)
    plain = unload(loaded)
    assert torch.equal(plain(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
    assert not _mole_layers(plain) and lorakit.adapters.state.get_state(plain) is None


@pytest.mark.parametrize("fields,message", [
    ({"num_experts": 2, "top_k": 3}, "method.top_k: must be between 1 and num_experts=2 (got 3)"),
    ({"num_experts": 0}, "method.num_experts: must be > 0 (got 0)"),
    ({"r": 0}, "method.r: must be > 0 (got 0)"),
    ({"router_init": "ones"}, "method.router_init: must be one of zeros, normal (got 'ones')"),
    ({"aux_loss_weight": -1}, "method.aux_loss_weight: must be >= 0 (got -1.0)"),
])
def test_bad_configs_are_named(fields, message):
    with pytest.raises(ConfigError) as error:
        MoLE(**fields)
    assert str(error.value) == message


def test_training_loss_gets_the_balance_gradient_and_keeps_its_value():
    """make_loss_sum (the loop's loss): value = summed cross-entropy; gradient = that of
    cross-entropy + (sum of weighted balance losses) * trained tokens."""
    import torch.nn.functional as F

    from lorakit.train.precision import PRECISIONS
    from lorakit.train.step import make_loss_sum

    model = apply(tiny_llama(), MoLE(r=2, num_experts=3, top_k=2, aux_loss_weight=0.5, router_init="normal"))
    _perturb(model)
    ids = tiny_batch()
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    loss_sum = make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"])
    value = loss_sum({"input_ids": ids, "labels": labels})
    value.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=ids).logits
    cross_entropy = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    balance = sum(m.auxiliary_loss() for _, m in _mole_layers(model)) * (labels != -100).sum()
    (cross_entropy + balance).backward()
    assert torch.equal(value, cross_entropy)
    assert loss_sum.auxiliary.take().item() == approx(balance.item(), reduction=TINY)
    assert loss_sum.auxiliary.take() is None
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(ours[name], param.grad, msg=name, **tol(reduction=TINY))
    assert ours["model.layers.0.mlp.up_proj.router.weight"].abs().sum() > 0


def test_lorakit_train_with_method_mole(tmp_path, one_thread):
    from _method_runs import losses

    from lorakit.models import load_model

    root = make_workdir(tmp_path)
    result = run_method(root, {"name": "mole", "r": 4, "num_experts": 2, "top_k": 1}, steps=10, lr=1e-2)
    curve = losses(result.run_dir)  # full-batch steps on the same rows
    assert curve[-1] < curve[0] - 0.5
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # logged: weight 0.01 x 14 layers x a Switch loss of at most k=2; the zero-initialised router
    # gives uniform gates, so step 1's loss is exactly 1 per layer
    assert records[0]["aux_loss"] == pytest.approx(0.01 * 14)
    assert all(0 < r["aux_loss"] <= 0.01 * 14 * 2 for r in records)
    reloaded = load_adapter(load_model(str(root / "base")), result.output)
    ids = tiny_batch(length=6)
    result.model.eval()
    assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
