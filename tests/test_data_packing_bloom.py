"""BLOOM (ALiBi) on packed rows: per-example bias, parity with examples run alone, and a probe that refuses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bloom
from test_data_packing import alone_losses, batches, examples, segments, vocab  # noqa: F401
from transformers.models.bloom import modeling_bloom

from lorakit.adapters import LoRA, apply
from lorakit.data import check_packing, packing
from lorakit.data.batching import block_causal_mask
from lorakit.data.packing import ALIBI_BUILDER, mask_positions, packed_forward
from lorakit.errors import DataError
from lorakit.train.config import TrainConfig
from lorakit.train.precision import PRECISIONS
from lorakit.train.setup import prepared
from lorakit.train.step import make_loss_sum


def bloom(seed: int = 0):
    # initializer_range 0.2: attention and the ALiBi bias visibly move the logits (0.02 leaves them near uniform)
    return tiny_bloom(seed, vocab_size=vocab(), hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.2)


def alone_logits(model, example):
    with torch.no_grad():
        return model(input_ids=torch.tensor([example["input_ids"]])).logits[0]  # (n, V)


def packed_examples(examples, batch):
    """(row, start, end, example) for every real (non-padding) example of a packed batch."""
    found = []
    for b, s, e in segments(batch):
        key = batch["input_ids"][b, s:e].tolist()
        if key != [0]:
            found.append((b, s, e, next(ex for ex in examples if ex["input_ids"] == key)))
    return found


def test_mask_positions_are_the_restarted_position_ids(examples):
    for batch in batches(examples, pack=True):
        assert torch.equal(mask_positions(batch["attention_mask"]), batch["position_ids"])
        assert torch.equal(mask_positions(batch["attention_mask"] == 0), batch["position_ids"])  # bool: True = attend


def test_packed_logits_and_losses_equal_examples_run_alone(examples):
    model = bloom()
    with packed_forward(model) as changed:
        assert changed.startswith("ALiBi bias built per example by lorakit")
        for batch in batches(examples, pack=True):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                logits = model(**inputs).logits  # (B, T, V)
            losses = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
            for b, s, e, ex in packed_examples(examples, batch):
                expected = alone_logits(model, ex)
                scale = expected.abs().max().item()  # fp32, ~1e-6 relative from reordered sums
                torch.testing.assert_close(logits[b, s:e], expected, atol=1e-5 * scale, rtol=1e-5)
                torch.testing.assert_close(losses[b, s:e], alone_losses(model, ex), atol=1e-5, rtol=1e-5)
    assert ALIBI_BUILDER not in model.transformer.__dict__  # the class's own method again


def test_training_run_on_packed_rows_gives_the_lora_gradients_of_examples_run_alone(examples):
    model = apply(bloom(), LoRA(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A a gradient too
            torch.nn.init.normal_(parameter, std=0.1)
    batch = batches(examples, pack=True, batch_size=16)[0]  # all 12 examples in 9 rows
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in trainable}

    with prepared(model, TrainConfig()) as call:  # what `lorakit train` enters
        packed_loss = make_loss_sum(call, torch.device("cpu"), PRECISIONS["fp32"])(batch)
        packed_grads = grads(packed_loss)
    assert ALIBI_BUILDER not in model.transformer.__dict__
    model.train()  # the same mode as inside `prepared` (dropout is 0 anyway)
    alone_loss = 0
    for _, _, _, ex in packed_examples(examples, batch):
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"][1:] + [-100]])
        alone_loss = alone_loss + F.cross_entropy(
            model(input_ids=ids, use_cache=False).logits[0], labels[0], ignore_index=-100, reduction="sum")
    alone_grads = grads(alone_loss)
    torch.testing.assert_close(packed_loss.detach(), alone_loss.detach(), atol=1e-4, rtol=1e-5)
    for name in alone_grads:
        scale = alone_grads[name].abs().max().item()
        torch.testing.assert_close(packed_grads[name], alone_grads[name], atol=1e-5 * scale, rtol=1e-5)


def test_check_packing_accepts_bloom_and_restores_it():
    model = bloom().train()
    check_packing(model)
    assert model.training and ALIBI_BUILDER not in model.transformer.__dict__


def test_check_packing_refuses_when_the_per_example_bias_is_wrong(monkeypatch):
    # a bias without the positions (as if transformers expected another layout): the probe sees it
    monkeypatch.setattr(packing, "mask_positions", lambda mask: torch.zeros_like(mask[:, 0, 0], dtype=torch.long))
    with pytest.raises(DataError, match=r"^packing is not leak-free for model type 'bloom' \(attention implementation "
                                        r"'eager'; ALiBi bias built per example by lorakit on transformers "):
        check_packing(bloom())


def test_check_packing_refuses_when_bloom_no_longer_calls_the_alibi_builder(monkeypatch):
    monkeypatch.setattr(packing, "ALIBI_BUILDER", "build_position_bias")  # nothing to extend: BLOOM's 2D-only path
    with pytest.raises(DataError, match="packing is not supported for model type 'bloom': the model failed on a "
                                        "packed batch"):
        check_packing(bloom())


def test_check_packing_refuses_when_bloom_ignores_the_4d_mask(monkeypatch):
    def causal_only(config, inputs_embeds, attention_mask, cache, **kwargs):
        rows, width = inputs_embeds.shape[:2]
        return block_causal_mask(torch.zeros(rows, width, dtype=torch.long))  # one segment: plain causal

    monkeypatch.setattr(modeling_bloom, "create_causal_mask", causal_only)
    with pytest.raises(DataError, match="packing is not leak-free for model type 'bloom'"):
        check_packing(bloom())


def test_generation_and_padded_batches_are_unchanged_inside_packed_forward():
    model = bloom()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding: BLOOM's 2D-mask path
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        outside = model.generate(ids, **options)
        padded = model(input_ids=ids, attention_mask=mask).logits
        with packed_forward(model):
            assert torch.equal(model.generate(ids, **options), outside)  # KV cache, 2D mask
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, padded)


def test_packed_bias_values_are_the_bias_of_each_example_run_alone(examples):
    model = bloom()
    batch = batches(examples, pack=True)[0]
    heads, rows, width = model.config.n_head, *batch["input_ids"].shape
    with packed_forward(model):
        for dtype in (torch.float32, torch.bfloat16):  # bitwise, not merely equal after softmax's shift invariance
            packed = model.transformer.build_alibi_tensor(batch["attention_mask"], heads, dtype=dtype)
            packed = packed.view(rows, heads, width)
            for b, s, e, _ in packed_examples(examples, batch):
                alone = model.transformer.build_alibi_tensor(torch.ones(1, e - s), heads, dtype=dtype)  # (H, 1, n)
                assert torch.equal(packed[b, :, s:e], alone[:, 0])
