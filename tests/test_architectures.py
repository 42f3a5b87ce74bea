"""Every architecture users bring, tiny and built from transformers' configs (no download).

For each: LoRA all-linear (plus the experts of MoE models, as 3-D parameters) trains and its loss
falls; peft loads the saved adapter with equal logits; merged equals unmerged; and packed rows
give the same per-token losses as each example run alone, on every attention path lorakit may
pick (the dense block mask and per-example attention), in train mode with the base's own dropout
switched off (train.base_dropout: off, the default). Configs keep their own dropout (GPT-2, OPT
and Seed-OSS carry 0.1), so the dropout policy is part of what is tested.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from _tol import tol
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.adapters import LoRA, apply, merge
from lorakit.adapters.peft_format import save_adapter
from lorakit.data import check_packing, make_batches
from lorakit.errors import DataError
from lorakit.train import TrainConfig, read_metrics, train, varlen
from lorakit.train.setup import prepared

VOCAB, MAX_LENGTH = 96, 40
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1)
MOE = ["experts.gate_up_proj", "experts.down_proj"]
# model_type -> extra config fields (sliding windows wider than MAX_LENGTH: see the sliding-window test)
ARCHITECTURES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": dict(head_dim=8),
    "qwen3_moe": dict(head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gemma": dict(head_dim=8), "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=64),
    "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=64),
    "phi3": {}, "phi": {}, "olmo": {}, "olmo2": {}, "granite": {}, "smollm3": {}, "stablelm": {},
    "starcoder2": {}, "cohere": dict(logit_scale=1.0), "glm": {}, "exaone4": {}, "seed_oss": {},
    "gpt2": {}, "gpt_neox": {}, "opt": dict(ffn_dim=48, word_embed_proj_dim=32),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2), "bloom": {},
}


def build(model_type: str, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**COMMON, **ARCHITECTURES[model_type], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def lora_for(model: torch.nn.Module) -> LoRA:
    experts = any(p.ndim == 3 for p in model.parameters())
    return LoRA(r=4, alpha=8, targets="all-linear", target_parameters=MOE if experts else [])


def examples(n: int = 10, seed: int = 0) -> list[dict]:
    """Learnable rows: a 2-token prompt (untrained), then a completion that counts up (trained)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(6, 17, (1,), generator=generator))
        start = int(torch.randint(3, VOCAB - 20, (1,), generator=generator))
        ids = [start + k for k in range(length)]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def batches_of(rows: list[dict], pack: bool, epoch: int = 0) -> list[dict]:
    return make_batches(rows, 4, pack=pack, max_length=MAX_LENGTH, pad_id=0, seed=1, epoch=epoch)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_lora_trains_loads_in_peft_and_merges(tmp_path, model_type):
    base = build(model_type).eval()
    model = apply(copy.deepcopy(base), lora_for(base))
    rows = examples()
    cfg = TrainConfig(lr=2e-2, epochs=3, micro_batch_size=4, schedule="constant", progress="none")
    train(model, cfg, train_batches=lambda epoch: batches_of(rows, pack=False, epoch=epoch), run_dir=tmp_path / "run")
    curve = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert curve[-1] < 0.9 * curve[0], f"{model_type}: loss {curve[0]:.4f} -> {curve[-1]:.4f}"

    model.eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    tuned = logits(model, ids)
    assert (tuned - logits(base, ids)).abs().max() > 1e-3  # the adapter changed something
    folder = save_adapter(model, tmp_path / "adapter")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    bound = tol(torch.float32, reduction=COMMON["intermediate_size"], scale=tuned.abs().max().item())
    torch.testing.assert_close(logits(in_peft, ids), tuned, **bound)
    merged = merge(copy.deepcopy(model))
    assert not any(type(m).__module__.startswith("lorakit.") for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), tuned, **bound)


def token_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs).logits.float()  # (B, T, V)
    return F.cross_entropy(out.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")


def alone_losses(model: torch.nn.Module, row: dict) -> torch.Tensor:
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor([row["labels"][1:] + [-100]])
    return token_losses(model, {"input_ids": ids, "labels": labels})[0]


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_packed_rows_equal_each_example_alone_in_train_mode(model_type):
    model = apply(build(model_type), lora_for(build(model_type)))
    with torch.no_grad():  # adapters away from zero, so they take part in what is compared
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    check_packing(model, max_length=MAX_LENGTH)
    rows = examples(12, seed=1)
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    bound = tol(torch.float32, reduction=COMMON["intermediate_size"], scale=10.0)  # losses up to ~10
    with prepared(model, TrainConfig(progress="none")) as call:  # train mode, base dropout off
        assert model.training
        for batch in batches_of(rows, pack=True):
            paths = {"dense": token_losses(call, varlen.strip_varlen_inputs(batch))}
            if varlen.is_enabled(model):
                with_cu = varlen.varlen_inputs(batch)
                assert varlen.CU_KEYS[0] in with_cu
                paths["per-example"] = token_losses(call, with_cu)
            for b, positions in enumerate(batch["position_ids"].tolist()):
                starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
                for s, e in zip(starts, starts[1:]):
                    row = by_ids.get(tuple(batch["input_ids"][b, s:e].tolist()))
                    if row is None:
                        continue  # padding
                    expected = alone_losses(call, row)
                    for path, losses in paths.items():
                        torch.testing.assert_close(losses[b, s:e], expected, **bound,
                                                   msg=lambda m: f"{model_type} {path}: {m}")


def test_sliding_window_shorter_than_the_rows_refuses_packing():
    model = build("gemma2", sliding_window=8)
    with pytest.raises(DataError) as error:
        check_packing(model, max_length=MAX_LENGTH)
    assert str(error.value) == (
        "packing is not exact for model type 'gemma2': it uses sliding-window attention (window 8) shorter "
        f"than data.max_length ({MAX_LENGTH}), which a packed row's mask cannot express; set data.max_length "
        "<= 8 or data.packing: false")
    check_packing(model, max_length=8)  # rows no longer than the window: exact
