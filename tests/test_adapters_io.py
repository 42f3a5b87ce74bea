"""Adapter folders: what is written, and clear refusals for folders that do not fit."""
import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from test_adapters_layer import logits, perturb_

from lorakit.adapters import LoRA, apply, load_adapter, save_adapter
from lorakit.adapters.layers import LoRALayer
from lorakit.errors import AdapterError


@pytest.fixture
def llama_adapter(tmp_path):
    """A saved q/v adapter of the tiny Llama, with perturbed weights."""
    model = perturb_(apply(tiny_llama(), LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"])))
    return save_adapter(model, tmp_path / "adapter"), model


def assert_untouched(model):
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert not hasattr(model, "lorakit_adapter")


def test_folder_holds_peft_config_and_safetensors_with_peft_keys(llama_adapter):
    folder, _ = llama_adapter
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["fan_in_fan_out"] is False
    assert (config["r"], config["lora_alpha"], config["bias"], config["modules_to_save"]) == (4, 8, "none", None)
    assert sorted(load_file(folder / "adapter_model.safetensors")) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
        for i in (0, 1) for p in "qv" for ab in "AB")


def test_round_trip_in_lorakit_gives_equal_logits(llama_adapter):
    folder, model = llama_adapter
    loaded = load_adapter(tiny_llama(), folder)
    assert torch.equal(logits(loaded), logits(model))
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad]


def test_base_model_name_is_recorded(tmp_path):
    model = apply(tiny_gpt2(), LoRA(r=2, targets="c_attn"))
    model.config._name_or_path = "org/tiny-gpt2"
    config = json.loads((save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-gpt2" and config["fan_in_fan_out"] is True
    config = json.loads((save_adapter(model, tmp_path / "b", "other/base") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "other/base"


def test_shapes_that_do_not_fit_name_the_module_and_both_shapes(llama_adapter):
    folder, _ = llama_adapter
    wider = tiny_llama(hidden_size=48)
    with pytest.raises(AdapterError) as error:
        load_adapter(wider, folder)
    assert str(error.value) == (
        f"{folder / 'adapter_model.safetensors'}: LoRA weights for module 'model.layers.0.self_attn.q_proj' do not "
        "fit the base model: lora_A is (4, 32) and lora_B is (32, 4), but the base layer maps 48 -> 48, so r=4 "
        "needs lora_A (4, 48) and lora_B (48, 4)")
    assert_untouched(wider)


def test_targets_missing_from_the_base_model_are_named(tmp_path):
    folder = save_adapter(apply(tiny_gpt2(), LoRA(r=2, targets="c_attn")), tmp_path / "gpt2")
    llama = tiny_llama()
    with pytest.raises(AdapterError, match="the adapter has LoRA weights for module 'transformer.h.0.attn.c_attn', "
                                           "which LlamaForCausalLM does not have"):
        load_adapter(llama, folder)
    assert_untouched(llama)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "incomplete metadata, file not fully covered"),
    (lambda data: b"not a safetensors file", "header too large"),
    (lambda data: b"", "header too small"),
])
def test_corrupt_or_truncated_weights_give_a_clear_error(llama_adapter, damage, message):
    folder, _ = llama_adapter
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    model = tiny_llama()
    with pytest.raises(AdapterError) as error:
        load_adapter(model, folder)
    assert str(error.value).startswith(f"cannot read {weights}: ")
    assert message in str(error.value) and "corrupt or truncated" in str(error.value)
    assert_untouched(model)


def test_missing_files_and_pickled_weights(llama_adapter, tmp_path):
    folder, _ = llama_adapter
    with pytest.raises(AdapterError, match="adapter folder .*nowhere' does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="lorakit reads safetensors only and never unpickles weights"):
        load_adapter(tiny_llama(), folder)
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors not found"):
        load_adapter(tiny_llama(), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("edit, message", [
    (dict(peft_type="PREFIX_TUNING"), "peft_type is 'PREFIX_TUNING'; lorakit.load_adapter reads LoRA adapters"),
    (dict(lora_bias=True), "the adapter uses lora_bias, which lorakit's LoRA does not support"),
    (dict(use_dora=True), "use_dora is true but module"),  # a LoRA folder relabelled as DoRA lacks magnitudes
    (dict(rank_pattern={"q_proj": 2}), "the adapter uses rank_pattern, which lorakit's LoRA does not support"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' rewrites the base weights"),
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(lora_dropout=-0.5), "method.dropout: must be in [0, 1) (got -0.5)"),
    (dict(target_modules=["k_proj"]), "module 'model.layers.0.self_attn.q_proj' has LoRA weights but "
                                      "adapter_config.json's target_modules ['k_proj'] does not select it"),
])
def test_configs_lorakit_cannot_honour_are_refused(llama_adapter, edit, message):
    folder, _ = llama_adapter
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    model = tiny_llama()
    with pytest.raises(AdapterError) as error:
        load_adapter(model, folder)
    assert message in str(error.value) and str(path.parent) in str(error.value)
    assert_untouched(model)


def test_unexpected_or_incomplete_tensors_are_refused(llama_adapter):
    folder, _ = llama_adapter
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(32)}, weights)
    with pytest.raises(AdapterError, match="unexpected key 'model.norm.weight': it is neither a LoRA weight, nor a "
                                           "trained bias"):
        load_adapter(tiny_llama(), folder)
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj.lora_B" not in k}, weights)
    with pytest.raises(AdapterError, match="module 'model.layers.1.self_attn.v_proj' has no lora_B weight"):
        load_adapter(tiny_llama(), folder)
    save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}, weights)
    with pytest.raises(AdapterError, match="does not start with 'base_model.model.'"):
        load_adapter(tiny_llama(), folder)


def test_eval_mode_survives_apply_so_dropout_stays_off():
    model = perturb_(apply(tiny_llama(), LoRA(r=2, targets="q_proj", dropout=0.5)))
    assert not any(m.training for m in model.modules())
    assert torch.equal(logits(model), logits(model))


def test_modules_to_save_the_base_lacks_are_named_with_the_config_file(tmp_path):
    folder = save_adapter(apply(tiny_llama(), LoRA(r=2, targets="q_proj", modules_to_save=["lm_head"])), tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": ["score"]}))
    with pytest.raises(AdapterError, match=r"adapter_config.json: modules_to_save entry 'score' matches no module"):
        load_adapter(tiny_llama(), folder)


def test_the_saved_config_is_the_one_applied_not_a_later_edit(tmp_path):
    cfg = LoRA(r=2, alpha=4, targets="q_proj")
    model = apply(tiny_llama(), cfg)
    cfg.alpha = 64
    config = json.loads((save_adapter(model, tmp_path) / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 4
