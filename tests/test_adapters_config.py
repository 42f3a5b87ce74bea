"""Method configs, the registry, validation messages, and target matching."""
import pytest
import torch
from conftest import tiny_bloom, tiny_gpt2, tiny_llama

import lorakit
from transformers import AutoModelForCausalLM

from lorakit.adapters import METHODS, Full, LoRA, apply, find_targets, load_adapter, save_adapter, trainable_parameters
from lorakit.adapters.layers import LoRALayer
from lorakit.adapters.registry import CONTRACT, implementation
from lorakit.adapters.match import compact_targets
from lorakit.errors import AdapterError, ConfigError

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_registry_maps_names_to_config_classes():
    assert METHODS["lora"] is LoRA and LoRA.name == "lora"
    assert METHODS["full"] is Full and Full.name == "full"
    assert lorakit.LoRA is LoRA


def test_every_method_implements_the_whole_contract():
    """Each registered method's implementation module defines every function of the one contract."""
    for cls in METHODS.values():
        module = implementation(cls)
        missing = [name for name in CONTRACT if not callable(getattr(module, name, None))]
        assert not missing, f"{cls.__name__} ({cls.implementation}) lacks {missing}"


@pytest.mark.parametrize("method", [Full(), LoRA(r=2, targets=["q_proj", "down_proj"], bias="all"),
                                    lorakit.DoRA(r=2), lorakit.QLoRA(r=2), lorakit.PromptTuning(num_virtual_tokens=3),
                                    lorakit.Bottleneck(size=4), lorakit.MoLE(r=2, num_experts=3)],
                         ids=lambda m: type(m).__name__)
def test_count_on_a_meta_skeleton_equals_the_applied_model(method):
    """count() reads shapes only: on a weightless meta skeleton it gives what the real applied model trains."""
    real = tiny_llama()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(real.config)
    groups = lorakit.count(skeleton, method)
    if not isinstance(method, lorakit.QLoRA):  # QLoRA's real apply quantises (tested in test_adapters_qlora)
        assert sum(groups.values()) == trainable_parameters(apply(real, method))[0]
    else:
        assert groups == lorakit.count(tiny_llama(), LoRA(r=2))


def test_every_registered_method_is_a_top_level_name():
    """`lorakit.apply(model, lorakit.<Method>(...))` works for every method in the registry."""
    for cls in METHODS.values():
        assert getattr(lorakit, cls.__name__) is cls
    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None
    assert set(METHODS) >= {"full", "lora", "dora", "qlora", "prompt_tuning", "bottleneck", "mole"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "method.r: must be > 0 (got 0)"),
    (dict(r=-4), "method.r: must be > 0 (got -4)"),
    (dict(r=2.5), "method.r: expected int (got 2.5)"),
    (dict(dropout=-0.1), "method.dropout: must be in [0, 1) (got -0.1)"),
    (dict(dropout=1.0), "method.dropout: must be in [0, 1) (got 1.0)"),
    (dict(alpha=0), "method.alpha: must be > 0 (got 0.0)"),
    (dict(bias="some"), "method.bias: must be one of none, all, lora_only (got 'some')"),
    (dict(init="xavier"), "method.init: must be one of kaiming, gaussian (got 'xavier')"),
    (dict(targets=[]), "method.targets: must be a module name, a pattern, 'all-linear' or a non-empty list of them (got [])"),
])
def test_bad_config_values_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ConfigError) as error:
        LoRA(**kwargs)
    assert str(error.value) == message


def test_rank_above_min_dims_is_refused_naming_the_module_and_the_model_is_untouched():
    model = tiny_llama()  # k_proj maps 32 -> 16 (2 kv heads of 8)
    with pytest.raises(AdapterError) as error:
        apply(model, LoRA(r=20, targets=["q_proj", "k_proj"]))
    assert str(error.value) == ("rank r=20 is larger than min(d_in, d_out) = 16 of module "
                                "'model.layers.0.self_attn.k_proj' (Linear 32 -> 16); use r <= 16")
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_apply_refuses_a_second_adapter_and_non_configs():
    model = apply(tiny_llama(), LoRA(r=2, targets="q_proj"))
    with pytest.raises(AdapterError, match="already carries a 'lora' adapter; merge or unload it"):
        apply(model, LoRA(r=2, targets="v_proj"))
    with pytest.raises(ConfigError, match="is not a method config"):
        apply(tiny_llama(), {"name": "lora"})


def test_full_fine_tuning_trains_everything_and_saves_the_whole_model(tmp_path):
    model = tiny_llama()
    model.requires_grad_(False)
    apply(model, Full())
    trainable, total = trainable_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    folder = save_adapter(model, tmp_path / "a")  # the method's own save: the whole model
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(AdapterError, match="holds a whole fine-tuned model, not an adapter"):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(AdapterError, match="carries no lorakit adapter"):
        save_adapter(tiny_llama(), tmp_path / "b")


# ------------------------------------------------------------------------------------ matching

def test_exact_name_dotted_suffix_regex_and_list_forms():
    model = tiny_llama()
    assert find_targets(model, "model.layers.1.mlp.up_proj") == ["model.layers.1.mlp.up_proj"]
    assert find_targets(model, "q_proj") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, "1.self_attn.q_proj") == ["model.layers.1.self_attn.q_proj"]
    assert find_targets(model, r".*\.0\.self_attn\.[qv]_proj") == ["model.layers.0.self_attn.q_proj",
                                                                    "model.layers.0.self_attn.v_proj"]
    assert find_targets(model, ["v_proj", "q_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_all_linear_takes_every_linear_and_conv1d_but_not_the_output_head():
    assert find_targets(tiny_llama(), "all-linear") == [
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in (0, 1) for p in LLAMA_PROJ]
    gpt2 = find_targets(tiny_gpt2(), "ALL-LINEAR")
    assert gpt2 == [f"transformer.h.{i}.{p}" for i in (0, 1)
                    for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    bloom = find_targets(tiny_bloom(), "all-linear")
    assert "transformer.h.0.self_attention.query_key_value" in bloom and len(bloom) == 8
    assert "lm_head" not in bloom


def test_a_spec_matching_nothing_lists_the_closest_module_names():
    with pytest.raises(AdapterError) as error:
        find_targets(tiny_llama(), ["q_proj", "v_prj"])
    message = str(error.value)
    assert message.startswith("target 'v_prj' matches no module of LlamaForCausalLM; closest module names: ")
    assert "v_proj" in message.split(": ", 1)[1]
    with pytest.raises(AdapterError, match="target 'zzz' matches no module of GPT2LMHeadModel; modules LoRA can "
                                           "wrap: c_attn, c_fc, c_proj, lm_head"):
        find_targets(tiny_gpt2(), "zzz")


def test_a_matched_module_of_an_unsupported_type_is_named():
    with pytest.raises(AdapterError) as error:
        find_targets(tiny_llama(), ["q_proj", "embed_tokens"])
    assert str(error.value) == ("target module 'model.embed_tokens' has type Embedding, which LoRA cannot wrap; "
                                "supported layer types: Conv1D, Linear")


def test_compact_target_names_only_when_they_select_exactly_the_same_modules():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert compact_targets(llama, find_targets(llama, ["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    only_first = find_targets(llama, "model.layers.0.self_attn.q_proj")
    assert compact_targets(llama, only_first) == only_first
    attn_proj = find_targets(gpt2, r".*attn\.c_proj")  # the leaf 'c_proj' would also take mlp.c_proj
    assert compact_targets(gpt2, attn_proj) == attn_proj


def test_modules_to_save_are_not_also_lora_targets():
    model = apply(tiny_llama(), LoRA(r=2, targets=["q_proj", "o_proj"], modules_to_save=["o_proj"]))
    modules = dict(model.named_modules())
    assert isinstance(modules["model.layers.0.self_attn.q_proj"], LoRALayer)
    assert not isinstance(modules["model.layers.0.self_attn.o_proj"], LoRALayer)
    assert modules["model.layers.0.self_attn.o_proj"].weight.requires_grad
    with pytest.raises(AdapterError, match="modules_to_save entry 'scor' matches no module"):
        apply(tiny_llama(), LoRA(targets="q_proj", modules_to_save=["scor"]))


def test_the_public_api_from_the_issue(tmp_path):
    model = lorakit.apply(tiny_llama(), lorakit.LoRA(r=16, alpha=32, targets="all-linear", dropout=0.05,
                                                      bias="none", rslora=False))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 2 * 16 * (4 * 32 + 16 + 32 + 16 + 32 + 3 * (32 + 64))  # q,o: 32->32; k,v: 32->16; mlp
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    plain = lorakit.merge(loaded)
    assert type(plain).__name__ == "LlamaForCausalLM" and lorakit.trainable_parameters(plain)[1] < total
