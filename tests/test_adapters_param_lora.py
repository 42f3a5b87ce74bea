"""LoRA on parameters (MoE experts as 3-D tensors) and on subclasses of supported layers."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from _tol import tol
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from lorakit.adapters import DoRA, LoRA, apply, load_adapter, merge, unload
from lorakit.adapters.param_lora import ParamLoRA, experts_note, param_delta
from lorakit.adapters.peft_format import save_adapter
from lorakit.errors import AdapterError, ConfigError

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def perturbed(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_param_delta_is_one_low_rank_product_per_expert():
    experts, d_out, d_in, r = 3, 5, 4, 2
    A, B = torch.randn(r * experts, d_in), torch.randn(d_out, r * experts)
    delta = param_delta(A, B, 0.5, torch.Size((experts, d_out, d_in)), transposed=False)
    for e in range(experts):
        A_e = A[e * r:(e + 1) * r]  # peft stacks the A_e one after the other
        B_e = B[:, e::experts]  # and interleaves the B_e columns
        torch.testing.assert_close(delta[e], 0.5 * B_e @ A_e)
    transposed = param_delta(A, B, 0.5, torch.Size((experts, d_in, d_out)), transposed=True)
    torch.testing.assert_close(transposed, delta.transpose(1, 2))


def test_expert_lora_starts_at_the_base_and_only_adapter_weights_train():
    base = tiny_mixtral()
    model = apply(copy.deepcopy(base), LoRA(r=2, targets=[], target_parameters=EXPERTS))
    assert torch.equal(logits(model), logits(base))
    assert isinstance(model.model.layers[0].mlp.experts, ParamLoRA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.experts.lora_{ab}.{p}.weight" for i in range(2) for ab in "AB"
                         for p in ("gate_up_proj", "down_proj")}
    assert set(base.state_dict()) <= set(model.state_dict())  # base keys untouched


@pytest.mark.parametrize("targets", [[], ["q_proj", "o_proj"]])
def test_peft_reads_lorakit_expert_adapters_and_lorakit_reads_peft_s(tmp_path, targets):
    base = tiny_mixtral()
    model = perturbed(apply(copy.deepcopy(base), LoRA(r=2, targets=targets, target_parameters=EXPERTS)))
    expected = logits(model)
    save_adapter(model, tmp_path / "lk")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    bound = tol(torch.float32, reduction=24, scale=expected.abs().max().item())
    torch.testing.assert_close(logits(in_peft), expected, **bound)
    in_peft.save_pretrained(tmp_path / "pf")
    back = load_adapter(copy.deepcopy(base), tmp_path / "pf")
    torch.testing.assert_close(logits(back), expected, **bound)


def test_merge_and_unload_give_plain_modules():
    base = tiny_mixtral()
    model = perturbed(apply(copy.deepcopy(base), LoRA(r=2, targets=[], target_parameters=EXPERTS)))
    expected = logits(model)
    merged = merge(copy.deepcopy(model))
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(merged), expected, **tol(torch.float32, reduction=24,
                                                                scale=expected.abs().max().item()))
    assert torch.equal(logits(unload(model)), logits(base))


def test_config_mistakes_are_one_clear_line():
    with pytest.raises(ConfigError, match="^method.dropout: must be 0 with target_parameters"):
        LoRA(dropout=0.1, target_parameters=EXPERTS)
    with pytest.raises(ConfigError, match=r"^method.target_parameters: is supported by method lora only, not dora"):
        DoRA(target_parameters=EXPERTS)
    with pytest.raises(AdapterError) as error:
        apply(tiny_mixtral(), LoRA(targets=[], target_parameters=["experts.up_proj"]))
    assert str(error.value) == ("target_parameters entry 'experts.up_proj' matches no parameter of "
                                "MixtralForCausalLM; 3-D parameters it has: down_proj, gate_up_proj")


def test_a_run_says_when_experts_stay_frozen():
    assert experts_note(apply(tiny_mixtral(), LoRA(r=2))) == (
        "note: the MoE experts (down_proj, gate_up_proj: 3-D parameters) are frozen, because LoRA targets modules "
        "and experts are not modules; add method.target_parameters: ['down_proj', 'gate_up_proj'] to adapt them")
    assert experts_note(apply(tiny_mixtral(), LoRA(r=2, target_parameters=EXPERTS))) is None


class Unfused(nn.Linear):
    """Falcon's pattern: nn.Linear's math written out (x @ W.T + b)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_is_wrapped_only_when_its_forward_is_linear():
    torch.manual_seed(0)
    model = nn.Sequential(Unfused(8, 8), nn.ReLU(), Doubled(8, 8))
    x = torch.randn(3, 8)
    adapted = apply(copy.deepcopy(model), LoRA(r=2, targets=["0"]))
    assert type(adapted[0]).__name__ == "LoRALayer"
    torch.testing.assert_close(adapted(x), model(x), **tol(torch.float32, reduction=8))
    with pytest.raises(AdapterError) as error:
        apply(copy.deepcopy(model), LoRA(r=2, targets=["2"]))
    assert str(error.value) == ("target module '2' has type Doubled, a subclass of Linear whose forward does not "
                                "compute Linear's output from its own weights, so LoRA cannot wrap it; leave it "
                                "out of targets")


def test_a_user_trains_moe_experts_with_the_cli_then_generates_and_merges(tmp_path, capsys):
    import json

    import yaml
    from _method_runs import ROWS, _tokenizer
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    tokenizer = _tokenizer(tuple(r["prompt"] + r["completion"] for r in ROWS), 300)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = {"name": "moe", "model": {"name_or_path": str(tmp_path / "base")},
              "method": {"name": "lora", "r": 4, "targets": [], "target_parameters": EXPERTS},
              "data": {"source": str(tmp_path / "rows.jsonl"), "val_fraction": 0.0, "max_length": 48,
                       "packing": True},
              "train": {"lr": 1e-2, "epochs": 15, "micro_batch_size": 12, "progress": "none"},
              "output_dir": str(tmp_path / "runs")}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "moe.yaml")]) == 0
    out = capsys.readouterr().out
    assert "base dropout: none in this model" in out and "MoE experts" not in out  # experts are adapted
    run = tmp_path / "runs" / "moe"
    curve = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1] < 0.75 * curve[0]
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_parameters"] == sorted(EXPERTS) and adapter_config["target_modules"] is None
    assert main(["generate", "Copy the word tiger.", "--adapter", str(run / "adapter"), "--max-new-tokens", "4"]) == 0
    assert "### prompt 1: Copy the word tiger." in capsys.readouterr().out
    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = load_adapter(MixtralForCausalLM.from_pretrained(tmp_path / "base").eval(), run / "adapter")
    ids = torch.tensor([tokenizer("Copy the word tiger.")["input_ids"]])
    with torch.no_grad():
        expected = adapted(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected,
                                   **tol(torch.float32, reduction=48, scale=expected.abs().max().item()))


def test_named_adapters_refuse_expert_adapters_with_the_way_out(tmp_path):
    from lorakit.adapters import add_adapter

    base = tiny_mixtral()
    save_adapter(apply(copy.deepcopy(base), LoRA(r=2, targets=[], target_parameters=EXPERTS)), tmp_path / "experts")
    with pytest.raises(AdapterError) as error:
        add_adapter(base, "experts", tmp_path / "experts")
    assert str(error.value) == (
        f"{tmp_path / 'experts' / 'adapter_config.json'}: the adapter adapts parameters (target_parameters, e.g. "
        "MoE experts), which named and per-row adapters (compare, serve) do not support yet; merge it first "
        "(lorakit merge ADAPTER OUT, then use OUT as the model) or load it alone (generate --adapter, "
        "lorakit.load_adapter)")
