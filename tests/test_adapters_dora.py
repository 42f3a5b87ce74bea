"""DoRA: the math, exact start, peft parity both ways (Llama nn.Linear, GPT-2 Conv1D), merge, counts, training."""
import json

import pytest
import torch
from _tol import TINY, tol
from _method_runs import losses, make_workdir, run_method
from safetensors.torch import load_file
from test_adapters_layer import build, logits, perturb_

from lorakit.adapters import apply, load_adapter, merge, save_adapter, trainable_parameters, unmerge
from lorakit.adapters.dora import DoRA, DoRALayer, dora_merged_weight, dora_param_count, weight_norm
from lorakit.adapters.state import lora_layers
from lorakit.errors import AdapterError, ConfigError

peft = pytest.importorskip("peft")

CASES = {
    "llama-all-bias": ("llama", DoRA(r=4, alpha=8, targets="all-linear", bias="lora_only")),
    "gpt2-conv1d-rslora": ("gpt2", DoRA(r=2, alpha=4, targets=["c_attn", "c_fc"], rslora=True)),
}


def peft_config(cfg: DoRA):
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.targets, bias=cfg.bias,
                           use_rslora=cfg.rslora, use_dora=True, task_type="CAUSAL_LM")


def test_weight_norm_is_the_row_norm_of_the_combined_weight_in_either_layout():
    W, delta = torch.randn(6, 4), torch.randn(6, 4)
    expected = torch.stack([(W[i] + delta[i]).pow(2).sum().sqrt() for i in range(6)])
    torch.testing.assert_close(weight_norm(W, delta), expected, **tol(reduction=4))
    torch.testing.assert_close(weight_norm(W.T, delta.T, fan_in_fan_out=True), expected, **tol(reduction=4))
    merged, scale = dora_merged_weight(W, delta, torch.full((6,), 2.0))
    torch.testing.assert_close(merged.norm(dim=1), torch.full((6,), 2.0), **tol(reduction=4))  # rows have norm m
    torch.testing.assert_close(scale, 2.0 / expected, **tol(reduction=4))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_fresh_dora_model_gives_exactly_the_base_logits_and_m_starts_at_the_weight_norm(arch):
    model = apply(build(arch), DoRA(r=4, targets="all-linear"))
    assert torch.equal(logits(model), logits(build(arch)))
    for _, layer in lora_layers(model):
        fifo = layer.kind.fan_in_fan_out
        assert torch.equal(layer.lora_magnitude_vector, torch.linalg.vector_norm(layer.weight, dim=0 if fifo else 1))


@pytest.mark.parametrize("case", list(CASES))
def test_dora_trainable_count_matches_the_formula_and_peft(case):
    arch, cfg = CASES[case]
    model = apply(build(arch), cfg)
    formula = sum(dora_param_count(layer.in_features, layer.out_features, cfg.r) for _, layer in lora_layers(model))
    formula += sum(layer.bias.numel() for _, layer in lora_layers(model) if layer.bias is not None) * (
        cfg.bias == "lora_only")
    theirs = peft.get_peft_model(build(arch), peft_config(cfg))
    assert trainable_parameters(model) == theirs.get_nb_trainable_parameters()
    assert trainable_parameters(model)[0] == formula


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_dora_loads_in_peft_with_equal_logits(case, tmp_path):
    arch, cfg = CASES[case]
    ours = perturb_(apply(build(arch), cfg)).eval()
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    assert not torch.allclose(logits(ours), logits(build(arch)), atol=1e-3)
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), **tol(reduction=TINY))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_dora_loads_in_lorakit_with_equal_logits_and_resaves_identically(case, tmp_path):
    arch, cfg = CASES[case]
    theirs = perturb_(peft.get_peft_model(build(arch), peft_config(cfg))).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build(arch), tmp_path / "peft").eval()
    assert isinstance(ours.lorakit_adapter.method, DoRA)
    torch.testing.assert_close(logits(ours), logits(theirs), **tol(reduction=TINY))
    save_adapter(ours, tmp_path / "ours")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(our_tensors) == sorted(peft_tensors) and any("lora_magnitude_vector" in k for k in our_tensors)
    assert all(torch.equal(our_tensors[k], v) for k, v in peft_tensors.items())


def test_gradients_reach_magnitude_a_and_b_but_not_through_the_norm():
    model = perturb_(apply(build("llama"), DoRA(r=4, targets=["q_proj"]))).train()
    model(torch.randint(3, 100, (2, 8))).logits.sum().backward()
    for _, layer in lora_layers(model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in (layer.lora_magnitude_vector, layer.lora_A.weight, layer.lora_B.weight))
    # the norm is a constant in backward (paper section 4.3): m's gradient is (dL/dy . (W x + s B A x)) / norm
    layer = lora_layers(model)[0][1]
    x = torch.randn(3, layer.in_features)
    layer.zero_grad()
    layer(x).sum().backward()
    with torch.no_grad():
        expected = (layer.kind.forward(x, layer.weight, None)
                    + layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T).sum(0) / layer.weight_norm()
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, expected, **tol(reduction=TINY))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_merge_equals_the_unmerged_forward_and_unmerge_restores_the_base(arch):
    model = perturb_(apply(build(arch), DoRA(r=4, targets="all-linear"))).eval()
    before = logits(model)
    base_weights = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    merge(model, keep_layers=True)
    torch.testing.assert_close(logits(model), before, **tol(reduction=TINY))
    merged_size = max(float(layer.weight.abs().max()) for _, layer in lora_layers(model))
    unmerge(model)
    for path, layer in lora_layers(model):  # m (W + dW) / norm undone: roundings at the merged size, a norm of TINY
        torch.testing.assert_close(layer.weight, base_weights[path], **tol(reduction=TINY, scale=merged_size))
    plain = merge(model)
    assert not any(isinstance(m, DoRALayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), before, **tol(reduction=TINY))


def test_dora_save_load_round_trips_exactly(tmp_path):
    ours = perturb_(apply(build("gpt2"), DoRA(r=2, targets="all-linear", bias="all"))).eval()
    save_adapter(ours, tmp_path)
    again = load_adapter(build("gpt2"), tmp_path).eval()
    assert torch.equal(logits(again), logits(ours))


def test_bad_dora_configs_and_folders_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^method.r: must be > 0 \(got 0\)$"):
        DoRA(r=0)
    ours = perturb_(apply(build("llama"), DoRA(r=2, targets=["q_proj"])))
    save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_magnitude_vector"))
    from safetensors.torch import save_file
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"use_dora is true but module 'model.layers.0.self_attn.q_proj' has "
                                           r"no lora_magnitude_vector"):
        load_adapter(build("llama"), tmp_path)


@pytest.mark.timeout(120)
def test_lorakit_train_with_method_dora_lowers_the_loss(tmp_path, one_thread):
    root = make_workdir(tmp_path)
    result = run_method(root, {"name": "dora", "r": 4, "alpha": 8}, steps=10, lr=2e-2)
    curve = losses(result.run_dir)
    assert curve[-1] < 0.8 * curve[0]
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True


def test_the_weight_norm_is_computed_once_per_layer_per_training_step(monkeypatch):
    import lorakit.adapters.dora as dora

    calls = []
    monkeypatch.setattr(dora, "weight_norm", lambda *a, **k: calls.append(1) or weight_norm(*a, **k))
    model = perturb_(apply(build("llama"), DoRA(r=2, targets="all-linear"))).train()
    calls.clear()  # apply computed each m = ||W|| once
    model(torch.randint(3, 100, (2, 8))).logits.sum().backward()  # forward + backward: no recomputation
    assert len(calls) == len(lora_layers(model))
