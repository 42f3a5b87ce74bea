"""Parity with peft (the oracle): adapter folders both ways, key names, trainable sets and counts."""
import json

import pytest
import torch
from safetensors.torch import load_file
from _tol import TINY, tol
from test_adapters_layer import build, logits, perturb_

from lorakit.adapters import (LoRA, apply, find_targets, load_adapter, parameter_report, save_adapter,
                              trainable_parameters)
from lorakit.adapters.lora_math import lora_param_count

peft = pytest.importorskip("peft")

CASES = {
    "llama-qv": ("llama", LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"])),
    "llama-regex-layer1": ("llama", LoRA(r=2, alpha=2, targets=r".*\.1\.(self_attn|mlp)\.(k|up)_proj")),
    "llama-all-bias-lm_head": ("llama", LoRA(r=4, alpha=8, targets="all-linear", dropout=0.05, bias="all",
                                              modules_to_save=["lm_head"])),
    "gpt2-lora_only-rslora": ("gpt2", LoRA(r=4, alpha=16, targets="all-linear", bias="lora_only", rslora=True)),
    "gpt2-all-lm_head": ("gpt2", LoRA(r=2, alpha=4, targets=["c_attn"], bias="all", modules_to_save=["lm_head"])),
    "bloom-qkv-rslora-gaussian": ("bloom", LoRA(r=4, alpha=8, targets=["query_key_value"], bias="lora_only",
                                                 rslora=True, init="gaussian")),
    "bloom-all": ("bloom", LoRA(r=8, alpha=4, targets="all-linear", bias="all")),
}


def peft_config(cfg: LoRA):
    """The peft LoraConfig that means the same as a lorakit LoRA config."""
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=cfg.dropout,
                           bias=cfg.bias, use_rslora=cfg.rslora, modules_to_save=cfg.modules_to_save or None,
                           init_lora_weights=True if cfg.init == "kaiming" else "gaussian", task_type="CAUSAL_LM")


def peft_model(arch, cfg):
    return peft.get_peft_model(build(arch), peft_config(cfg)).eval()


def live_name(peft_name: str) -> str:
    """A peft parameter name as it reads in a lorakit model."""
    name = peft_name.removeprefix("base_model.model.")
    for part in (".default", ".base_layer", ".modules_to_save"):
        name = name.replace(part, "")
    return name


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft_with_equal_logits(case, tmp_path):
    arch, cfg = CASES[case]
    ours = perturb_(apply(build(arch), cfg)).eval()
    save_adapter(ours, tmp_path, base_model_name_or_path=f"tiny-{arch}")
    assert not torch.allclose(logits(ours), logits(build(arch)), atol=1e-3)  # the adapter does something

    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), **tol(reduction=TINY))
    loaded = theirs.peft_config["default"]
    assert (loaded.r, loaded.lora_alpha, loaded.bias, loaded.use_rslora) == (cfg.r, cfg.alpha, cfg.bias, cfg.rslora)
    assert loaded.base_model_name_or_path == f"tiny-{arch}" and loaded.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorakit_with_equal_logits_and_resaves_identically(case, tmp_path):
    arch, cfg = CASES[case]
    theirs = perturb_(peft_model(arch, cfg))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build(arch), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(ours), logits(theirs), **tol(reduction=TINY))

    save_adapter(ours, tmp_path / "ours")  # same key names as peft, same tensors
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(our_tensors) == sorted(peft_tensors)
    assert all(torch.equal(our_tensors[k], v) for k, v in peft_tensors.items())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "modules_to_save", "fan_in_fan_out",
                "init_lora_weights", "peft_type"):
        assert our_json[key] == peft_json[key], key


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_set_and_counts_equal_peft(case):
    arch, cfg = CASES[case]
    ours, theirs = apply(build(arch), cfg), peft_model(arch, cfg)
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours_trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert ours_trainable == sorted(live_name(n) for n, p in theirs.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("case", list(CASES))
def test_exercise_2_counts_are_lora_pairs_plus_trained_biases_plus_saved_modules(case):
    arch, cfg = CASES[case]
    base = build(arch)
    saved = sum(p.numel() for n, p in base.named_parameters(remove_duplicate=False)
                if n.split(".")[0] in cfg.modules_to_save)
    targets = [t for t in find_targets(base, cfg.targets) if t not in cfg.modules_to_save]
    lora = 0
    for path in targets:
        weight = base.get_submodule(path).weight
        d_in, d_out = (weight.shape[0], weight.shape[1]) if arch == "gpt2" else (weight.shape[1], weight.shape[0])
        lora += lora_param_count(d_in, d_out, cfg.r)
    bias_owners = targets if cfg.bias == "lora_only" else [n for n, _ in base.named_modules()]
    biases = 0 if cfg.bias == "none" else sum(
        base.get_submodule(m).bias.numel() for m in bias_owners
        if isinstance(getattr(base.get_submodule(m), "bias", None), torch.nn.Parameter))
    base_total = sum(p.numel() for p in base.parameters())
    assert trainable_parameters(apply(build(arch), cfg)) == (lora + biases + saved, base_total + lora + saved)


@pytest.mark.parametrize("case", ["llama-all-bias-lm_head", "gpt2-all-lm_head"])
def test_report_headline_is_peft_print_and_rows_add_up(case, capsys):
    arch, cfg = CASES[case]
    peft_model(arch, cfg).print_trainable_parameters()
    report = parameter_report(apply(build(arch), cfg))
    headline, header, *rows = report.splitlines()
    assert headline == capsys.readouterr().out.strip()
    assert header.split() == ["module", "type", "modules", "trainable", "total"]
    numbers = [[int(cell.replace(",", "")) for cell in row.split()[-2:]] for row in rows]
    trainable, total = trainable_parameters(apply(build(arch), cfg))
    assert [sum(column) for column in zip(*numbers)] == [trainable, total]
    assert any(row.startswith("LoRA A+B") for row in rows)
