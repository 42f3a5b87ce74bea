"""Per-example ("varlen") attention for packed rows: equal losses and gradients, and clean fallbacks."""
from __future__ import annotations

import pytest
import torch
from _tol import TINY, approx, tol
from conftest import tiny_bloom, tiny_llama
from test_data_packing import MODELS, alone_losses, batches, examples, segments, token_losses, vocab  # noqa: F401
from test_speed_loss import packed_batch

from lorakit.adapters import LoRA, PromptTuning, apply
from lorakit.train import varlen
from lorakit.train.config import TrainConfig
from lorakit.train.precision import PRECISIONS
from lorakit.train.setup import compiled_layers, prepared
from lorakit.train.step import make_loss_sum


def varlen_losses(model, batch):
    with_cu = varlen.varlen_inputs(batch)
    assert "cu_seq_lens_q" in with_cu  # lorakit's packed mask is recognised
    before = varlen.calls["varlen"]
    losses = token_losses(model, with_cu)
    assert varlen.calls["varlen"] > before  # the per-example path ran
    return losses


@pytest.mark.parametrize("name", ["llama-sdpa", "qwen2", "gpt2"])
def test_varlen_per_token_losses_equal_one_by_one_and_the_dense_mask(examples, name):
    model = MODELS[name]()
    with varlen.enabled(model) as applies:
        assert applies
        for batch in batches(examples, pack=True):
            losses = varlen_losses(model, batch)  # (B, T)
            dense = token_losses(model, batch)  # no boundaries: the dense mask path
            torch.testing.assert_close(losses, dense, **tol(reduction=TINY))
            for b, s, e in segments(batch):
                key = batch["input_ids"][b, s:e].tolist()
                if key != [0]:
                    ex = next(ex for ex in examples if ex["input_ids"] == key)
                    torch.testing.assert_close(losses[b, s:e], alone_losses(model, ex), **tol(reduction=TINY))
    assert model.config._attn_implementation == "sdpa"  # restored


def lora_model(name: str) -> torch.nn.Module:
    base = tiny_llama(vocab_size=vocab(), max_position_embeddings=128) if name == "llama" else MODELS["qwen2"]()
    return apply(base, LoRA(r=4, alpha=8, targets="all-linear"))


def loss_and_grads(loss_of, model, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_of(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("chunked", [False, True])
def test_varlen_lora_gradients_equal_the_dense_mask(name, chunked):
    model = lora_model(name)
    batch = packed_batch(0)
    dense = loss_and_grads(make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"], chunked=chunked),
                           model, batch)
    before = varlen.calls["varlen"]
    with prepared(model, TrainConfig()) as call:
        assert varlen.is_enabled(call)
        loss_of = make_loss_sum(call, torch.device("cpu"), PRECISIONS["fp32"], chunked=chunked)
        per_example = loss_and_grads(loss_of, model, batch)
    assert varlen.calls["varlen"] > before and not varlen.is_enabled(model)
    torch.testing.assert_close(per_example[0], dense[0], **tol(reduction=TINY))
    assert per_example[1].keys() == dense[1].keys()
    for key in dense[1]:
        torch.testing.assert_close(per_example[1][key], dense[1][key], **tol(reduction=TINY))


def test_varlen_under_bf16_autocast_stays_close_to_the_dense_mask():
    model = lora_model("llama")
    batch = packed_batch(1)
    dense = make_loss_sum(model, torch.device("cpu"), PRECISIONS["bf16-autocast"])(batch).item()
    with prepared(model, TrainConfig(precision="bf16-autocast")) as call:
        assert varlen.is_enabled(call)
        got = make_loss_sum(call, torch.device("cpu"), PRECISIONS["bf16-autocast"])(batch).item()
    assert got == approx(dense, torch.bfloat16)


def test_only_lorakit_block_causal_masks_get_boundaries(examples):
    batch = batches(examples, pack=True)[0]
    with_cu = varlen.varlen_inputs(batch)
    cu = with_cu["cu_seq_lens_q"]
    rows, width = batch["input_ids"].shape
    starts = [b * width + s for b, s, _ in segments(batch)]
    assert cu.dtype == torch.int32 and cu.tolist() == starts + [rows * width]
    assert with_cu["cu_seq_lens_k"] is cu
    padded = batches(examples, pack=False)[0]
    assert varlen.varlen_inputs(padded) is padded
    other = dict(batch, attention_mask=batch["attention_mask"].clone())
    other["attention_mask"][0, 0, 0, 5] = 0.0  # a future token visible: not the positions' block-causal mask
    assert varlen.varlen_inputs(other) is other
    assert varlen.varlen_inputs({k: v for k, v in batch.items() if k != "position_ids"}).keys() == \
        batch.keys() - {"position_ids"}


def test_attention_falls_back_to_sdpa_for_what_it_does_not_cover(examples):
    model = MODELS["llama-sdpa"]()
    batch = varlen.varlen_inputs(batches(examples, pack=True)[0])
    attention = model.model.layers[0].self_attn
    rows, width = batch["input_ids"].shape
    q = torch.randn(rows, 4, width, 8)
    kv = torch.randn(rows, 2, width, 8)
    cu = batch["cu_seq_lens_q"]
    mask = batch["attention_mask"]
    expected, _ = varlen.varlen_attention_forward(attention, q, kv, kv, mask)  # no boundaries: SDPA + mask
    for extra in ({"sliding_window": 4}, {"output_attentions": True}, {"cu_seq_lens_k": cu.clone()}):
        before = varlen.calls["varlen"]
        out, _ = varlen.varlen_attention_forward(attention, q, kv, kv, mask, cu_seq_lens_q=cu,
                                                 **{"cu_seq_lens_k": cu, **extra})
        assert varlen.calls["varlen"] == before
        torch.testing.assert_close(out, expected)
    out, _ = varlen.varlen_attention_forward(attention, q, kv, kv, mask, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out, expected, **tol(reduction=64))  # keys per row, head size 8


def test_varlen_is_not_applied_where_it_does_not_fit():
    eager = MODELS["llama-eager"]()
    bloom = tiny_bloom()
    prompted = apply(tiny_llama(vocab_size=vocab(), max_position_embeddings=128), PromptTuning(num_virtual_tokens=2))
    for model in (eager, bloom, prompted, torch.nn.Linear(2, 2)):
        original = getattr(getattr(model, "config", None), "_attn_implementation", None)
        with varlen.enabled(model) as applies:
            assert not applies and not varlen.is_enabled(model)
        assert getattr(getattr(model, "config", None), "_attn_implementation", None) == original


@pytest.mark.timeout(180)
def test_compiled_layers_with_varlen_give_the_dense_losses(one_thread):
    torch._dynamo.reset()
    model = lora_model("llama")
    widths = [packed_batch(seed) for seed in (0, 1, 2)]  # packed batches of different widths
    dense = [make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"])(batch) for batch in widths]
    with varlen.enabled(model) as applies, compiled_layers(model, backend="aot_eager") as call:
        assert applies
        before = varlen.calls["varlen"]
        loss_of = make_loss_sum(call, torch.device("cpu"), PRECISIONS["fp32"], chunked=True)
        compiled = [loss_of(batch) for batch in widths]
        assert varlen.calls["varlen"] > before
    for got, expected in zip(compiled, dense):
        torch.testing.assert_close(got, expected, **tol(reduction=TINY))
