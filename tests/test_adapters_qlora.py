"""QLoRA: NF4 storage against bitsandbytes (the oracle), start, counts, save/load, merge, bad configs, training."""
import json

import pytest
import torch
import torch.nn.functional as F
from _tol import TINY, tol
from _method_runs import losses, make_workdir, run_method
from conftest import tiny_batch, tiny_gpt2, tiny_llama
from test_adapters_layer import perturb_
from torch import nn

from lorakit.adapters import apply, load_adapter, merge, save_adapter, trainable_parameters
from lorakit.adapters.lora_math import lora_param_count
from lorakit.adapters.qlora import QLoRA, dequantize, quantize_linear, quantize_model, storage_bytes
from lorakit.adapters.state import lora_layers
from lorakit.errors import AdapterError, ConfigError

bnb = pytest.importorskip("bitsandbytes")

LLAMA_BIASED = dict(attention_bias=True, mlp_bias=True)


def logits(model):
    with torch.no_grad():
        return model(tiny_batch()).logits


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The oracle base: every 4-bit layer replaced by an nn.Linear holding bitsandbytes' dequantised weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state))
            linear.bias = module.bias
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear)
    return model


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_stored_4bit_weights_equal_bitsandbytes_quantize_4bit(quant_type, double_quant):
    plain = tiny_llama(**LLAMA_BIASED)
    W, b = plain.model.layers[0].mlp.up_proj.weight.detach(), plain.model.layers[0].mlp.up_proj.bias.detach()
    model = apply(tiny_llama(**LLAMA_BIASED), QLoRA(r=2, quant_type=quant_type, double_quant=double_quant,
                                                    compute_dtype="fp32"))
    stored = model.model.layers[0].mlp.up_proj.weight
    codes, state = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=double_quant,
                                                quant_type=quant_type)
    assert torch.equal(stored.data, codes) and stored.quant_state.nested == double_quant
    oracle = bnb.functional.dequantize_4bit(codes, state)
    assert torch.equal(dequantize(stored), oracle)
    assert 0 < (oracle - W).abs().max() < 0.5 * W.abs().max()  # really rounded to 16 levels, but close
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer.kind.forward(x, stored, b), F.linear(x, oracle, b), **tol(reduction=TINY))


def test_nf4_with_double_quant_takes_about_half_a_byte_per_weight():
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(1024, 1024), "nf4", True, torch.bfloat16)
    per_weight = storage_bytes(layer.weight) / (1024 * 1024)
    # 4 bits, plus an 8-bit scale per 64 weights and an fp32 scale per 256 of those (paper section 3),
    # plus two small code books per layer
    assert 0.5 + 1 / 64 + 4 / (64 * 256) < per_weight < 0.5 + 1 / 64 + 4 / (64 * 256) + 2e-3
    unnested = quantize_linear(nn.Linear(1024, 1024), "nf4", False, torch.bfloat16)
    assert storage_bytes(unnested.weight) / (1024 * 1024) > 0.5 + 4 / 64  # an fp32 scale per 64 weights


def test_a_fresh_qlora_model_equals_its_dequantised_base_and_the_head_stays_unquantised():
    model = apply(tiny_llama(**LLAMA_BIASED), QLoRA(r=4, targets=["q_proj", "v_proj"], compute_dtype="fp32"))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)  # non-targets are quantised too
    oracle = dequantized_copy(_quantized_llama())
    torch.testing.assert_close(logits(model), logits(oracle), **tol(reduction=TINY))


def _quantized_llama():
    base = tiny_llama(**LLAMA_BIASED)
    quantize_model(base, compute_dtype="fp32")
    return base


def test_bf16_compute_runs_and_returns_the_model_dtype():
    model = apply(tiny_llama(), QLoRA(r=4, compute_dtype="bf16"))
    out = logits(model)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(layer.lora_A.weight.dtype == torch.float32 for _, layer in lora_layers(model))


def test_trainable_count_is_the_lora_formula_and_total_counts_logical_weights():
    cfg = QLoRA(r=4, targets="all-linear")
    model = apply(tiny_llama(), cfg)
    formula = sum(lora_param_count(layer.in_features, layer.out_features, 4) for _, layer in lora_layers(model))
    assert trainable_parameters(model) == (formula, sum(p.numel() for p in tiny_llama().parameters()) + formula)


def test_qlora_adapter_round_trips_exactly_onto_a_quantised_base(tmp_path):
    ours = perturb_(apply(tiny_llama(**LLAMA_BIASED), QLoRA(r=4, bias="lora_only", compute_dtype="fp32")))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    again = load_adapter(_quantized_llama(), tmp_path)
    assert torch.equal(logits(again), logits(ours))


def test_merge_dequantises_and_equals_the_unmerged_forward_and_requantising_costs_a_little():
    cfg = QLoRA(r=4, compute_dtype="fp32")
    model = perturb_(apply(tiny_llama(), cfg), std=0.05)
    before = logits(model)
    merged = merge(perturb_(apply(tiny_llama(), cfg), std=0.05))
    assert not any(isinstance(m, (bnb.nn.Linear4bit,)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), before, **tol(reduction=TINY))
    requantized = merge(perturb_(apply(tiny_llama(), cfg), std=0.05), requantize=True)
    for name in ("q_proj", "v_proj"):  # re-quantised: bitsandbytes' rounding of the merged weight
        merged_weight = getattr(merged.model.layers[1].self_attn, name).weight.detach()
        oracle = bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(merged_weight, quant_type="nf4",
                                                                                   compress_statistics=True))
        assert torch.equal(dequantize(getattr(requantized.model.layers[1].self_attn, name).weight), oracle)
    assert (logits(requantized) - before).abs().max() > 0  # the price of rounding to 4 bits again
    with pytest.raises(AdapterError, match="cannot keep the LoRA layers"):
        merge(apply(tiny_llama(), cfg), requantize=True, keep_layers=True)


def test_bad_qlora_configs_name_the_field_or_module():
    with pytest.raises(ConfigError, match=r"^method.quant_type: must be one of nf4, fp4 \(got 'int4'\)$"):
        QLoRA(quant_type="int4")
    with pytest.raises(ConfigError, match=r"^method.compute_dtype: must be one of fp32, bf16, fp16 \(got 'fp8'\)$"):
        QLoRA(compute_dtype="fp8")
    assert QLoRA(compute_dtype="bfloat16").compute_dtype == "bf16"  # an alias, stored as the one spelling
    with pytest.raises(AdapterError, match=r"QLoRA cannot quantise module 'transformer.h.0.attn.c_attn' \(Conv1D\)"):
        apply(tiny_gpt2(), QLoRA(r=2))
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"QLoRA cannot quantise module 'lm_head' \(Linear\)"):
        apply(model, QLoRA(r=2, targets=["q_proj", "lm_head"]))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # refused before anything changed


@pytest.mark.timeout(120)
def test_lorakit_train_with_method_qlora_lowers_the_loss(tmp_path, one_thread):
    root = make_workdir(tmp_path)
    result = run_method(root, {"name": "qlora", "r": 4, "alpha": 8, "compute_dtype": "fp32"}, steps=10, lr=2e-2)
    curve = losses(result.run_dir)
    assert curve[-1] < 0.8 * curve[0]


def test_qlora_accepts_an_already_quantised_base_and_dora_refuses_one():
    from lorakit.adapters.dora import DoRA

    model = apply(_quantized_llama(), QLoRA(r=2, targets=["q_proj"], compute_dtype="fp32"))
    assert len(lora_layers(model)) == 2
    with pytest.raises(AdapterError, match="DoRA needs the full base weight for its norm; Linear4bit stores it"):
        apply(_quantized_llama(), DoRA(r=2, targets=["q_proj"]))
