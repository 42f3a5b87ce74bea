"""The LoRA layer in a model: exact start, base keys, freezing, dropout, merge / unmerge / unload."""
import pytest
import torch
from _tol import TINY, tol
from conftest import TINY_MODELS, tiny_batch, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters import LoRA, apply, merge, unload, unmerge
from lorakit.adapters.layers import LoRALayer
from lorakit.errors import AdapterError

CONFIGS = {  # arch -> a config touching biases and modules_to_save
    "llama": LoRA(r=4, alpha=8, targets="all-linear", dropout=0.1, bias="all", modules_to_save=["lm_head"]),
    "gpt2": LoRA(r=4, alpha=16, targets="all-linear", dropout=0.1, bias="lora_only", rslora=True,
                 modules_to_save=["lm_head"]),
    "bloom": LoRA(r=2, alpha=4, targets=["query_key_value", "dense_4h_to_h"], bias="all"),
}
BIASED = {"llama": dict(attention_bias=True, mlp_bias=True)}  # tiny Llama has no biases by default


def build(arch, seed=0):
    return TINY_MODELS[arch](seed, **BIASED.get(arch, {}))


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 1, std: float = 0.2) -> nn.Module:
    """Move every trainable tensor away from its init (B != 0), so outputs actually change."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def logits(model, x=None):
    with torch.no_grad():
        return model(tiny_batch() if x is None else x).logits


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_a_fresh_adapter_gives_exactly_the_base_logits(arch):
    base, model = build(arch), apply(build(arch), CONFIGS[arch])
    assert torch.equal(logits(model), logits(base))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_base_checkpoint_keys_are_untouched_and_load_strictly(arch):
    original = build(arch).state_dict()
    model = perturb_(apply(build(arch, seed=5), CONFIGS[arch]))
    adapter_keys = {k for k in model.state_dict() if ".lora_A." in k or ".lora_B." in k}
    assert set(model.state_dict()) - adapter_keys == set(original)
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == adapter_keys
    for key, value in original.items():  # the base weights came back through the adapted model
        assert torch.equal(model.state_dict()[key], value), key


def test_only_adapter_parameters_receive_gradients():
    model = apply(tiny_llama(), LoRA(r=2, targets=["q_proj", "v_proj"]))
    model(tiny_batch()).logits.sum().backward()
    for name, param in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None) == is_lora, name


def test_dropout_acts_on_the_lora_branch_only_and_only_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(16, 12).requires_grad_(False), r=4, alpha=8, dropout=0.9)
    x = torch.randn(5, 16)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    layer.train()
    assert torch.equal(layer(x), base)  # B = 0: dropout never touches the base path
    perturb_(layer)
    layer.eval()
    expected = base + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected, **tol(reduction=16))
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), expected)
    assert isinstance(LoRALayer(nn.Linear(4, 4), r=2, alpha=2).lora_dropout, nn.Identity)


def test_conv1d_layer_matches_the_plain_conv1d_and_keeps_its_attributes():
    torch.manual_seed(0)
    conv = Conv1D(24, 8)  # nf=24 outputs, nx=8 inputs, weight (8, 24)
    layer = perturb_(LoRALayer(conv, r=2, alpha=4))
    x = torch.randn(3, 5, 8)
    delta = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling  # (24, 8)
    torch.testing.assert_close(layer(x), conv(x) + x @ delta.T, **tol(reduction=8))
    assert (layer.nf, layer.nx, layer.in_features, layer.out_features) == (24, 8, 8, 24)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_merge_gives_the_same_logits_and_returns_plain_layers(arch):
    model = perturb_(apply(build(arch), CONFIGS[arch])).eval()
    before = logits(model)
    merged = merge(model)
    assert merged is model and type(merged) is type(build(arch))
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    assert {type(m) for n, m in merged.named_modules() if n.endswith(("c_attn", "q_proj", "query_key_value"))} <= {
        nn.Linear, Conv1D}
    assert not hasattr(merged, "lorakit_adapter")
    torch.testing.assert_close(logits(merged), before, **tol(reduction=TINY))
    assert set(merged.state_dict()) == set(build(arch).state_dict())


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_unmerge_restores_the_base_weights(arch):
    model = perturb_(apply(build(arch), CONFIGS[arch])).eval()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    adapted = logits(model)
    merge(model, keep_layers=True)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALayer))
    assert not torch.equal(model.get_submodule(next(iter(weights))).weight, weights[next(iter(weights))])
    torch.testing.assert_close(logits(model), adapted, **tol(reduction=TINY))
    merged_size = max(float(model.get_submodule(name).weight.abs().max()) for name in weights)
    unmerge(model)
    for name, weight in weights.items():  # W + dW - dW: two roundings at the merged weight's size
        torch.testing.assert_close(model.get_submodule(name).weight, weight, **tol(scale=merged_size))
    torch.testing.assert_close(logits(model), adapted, **tol(reduction=TINY))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_unload_gives_back_exactly_the_base_model(arch):
    base = build(arch)
    plain = unload(perturb_(apply(build(arch), CONFIGS[arch])))  # biases and modules_to_save trained too
    assert not any(isinstance(m, LoRALayer) for m in plain.modules()) and not hasattr(plain, "lorakit_adapter")
    assert torch.equal(logits(plain), logits(base))
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.state_dict().items())
    if base.config.tie_word_embeddings:
        assert plain.lm_head.weight is plain.get_input_embeddings().weight


def test_unload_undoes_a_merge_within_float_tolerance():
    base = tiny_gpt2()
    model = perturb_(apply(tiny_gpt2(), LoRA(r=4, targets="all-linear")))
    merged = merge(model, keep_layers=True)
    merged_size = max(float(m.weight.abs().max()) for m in merged.modules() if isinstance(m, LoRALayer))
    plain = unload(merged)
    for key, value in base.state_dict().items():  # W + dW - dW: two roundings at the merged weight's size
        torch.testing.assert_close(plain.state_dict()[key], value, **tol(scale=merged_size))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_weights_naming_the_module(bad):
    model = perturb_(apply(tiny_gpt2(), LoRA(r=2, targets="c_fc")))
    layer = model.get_submodule("transformer.h.1.mlp.c_fc")
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = bad
    with pytest.raises(AdapterError) as error:
        merge(model)
    assert str(error.value).startswith("merging the LoRA adapter of module 'transformer.h.1.mlp.c_fc' gives NaN "
                                       "or Inf weights")
    assert all(not m.merged for m in model.modules() if isinstance(m, LoRALayer))
    assert torch.isfinite(layer.weight).all()


def test_merge_refuses_a_lora_target_whose_weight_is_tied():
    model = apply(tiny_gpt2(), LoRA(r=2, targets="lm_head"))
    with pytest.raises(AdapterError, match="module 'lm_head' shares its weight with 'transformer.wte.weight'"):
        merge(model)


def test_merged_modules_to_save_copy_unties_the_config():
    model = perturb_(apply(tiny_gpt2(), LoRA(r=2, targets="c_attn", modules_to_save=["lm_head"])))
    merged = merge(model)
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is False
    with pytest.raises(AdapterError, match="has no LoRA layers to unmerge"):
        unmerge(merged)


def test_half_precision_base_keeps_float32_adapter_weights_and_its_output_dtype():
    model = apply(tiny_llama().to(torch.bfloat16), LoRA(r=2, targets=["q_proj", "down_proj"]))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    perturb_(model)
    out = model(tiny_batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.dtype == torch.float32


def test_a_deep_copy_is_an_independent_adapted_model():
    import copy

    model = perturb_(apply(tiny_gpt2(), LoRA(r=2, targets="c_attn", modules_to_save=["lm_head"])))
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone), logits(model), atol=0, rtol=0)
    with torch.no_grad():
        clone.get_submodule("transformer.h.0.attn.c_attn").lora_B.weight.add_(1.0)
    assert not torch.equal(logits(clone), logits(model))
    plain = unload(clone)  # the copy's wrapped layers hold the copy's own parameters
    assert plain.get_submodule("transformer.h.0.attn.c_attn").weight is plain.state_dict(keep_vars=True)[
        "transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(logits(plain), logits(tiny_gpt2()))


def test_the_layer_refuses_a_module_type_it_cannot_wrap():
    with pytest.raises(AdapterError, match="LoRA cannot wrap a module of type Embedding; supported layer types: Conv1D, Linear"):
        LoRALayer(nn.Embedding(10, 4), r=2, alpha=2)
