"""Batches: shifted labels, padding, packing layout, and packed == unpacked per-token losses."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from _tiny import CORPUS, tiny_tokenizer
from conftest import tiny_gpt2, tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from lorakit.data import DataConfig, check_packing, make_batches, pack_lengths, tokenize_rows
from lorakit.data.batching import pack_balanced
from lorakit.errors import DataError

IGNORE = -100
MAX_LENGTH = 48


def tiny_qwen2(vocab_size: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).float().eval()


def vocab():
    return len(tiny_tokenizer())


MODELS = {
    "llama-sdpa": lambda: tiny_llama(vocab_size=vocab(), max_position_embeddings=128),
    "llama-eager": lambda: tiny_llama(vocab_size=vocab(), max_position_embeddings=128, attn_implementation="eager"),
    "gpt2": lambda: tiny_gpt2(vocab_size=vocab(), n_positions=128),
    "qwen2": lambda: tiny_qwen2(vocab()),
}


@pytest.fixture(scope="module")
def examples():
    rows = [{"prompt": f"Row {i}: " + text[: 3 * i], "completion": text[3 * i: 10 + 4 * i]}
            for i, text in enumerate(CORPUS[:4] * 3)]
    examples, _ = tokenize_rows(rows, tiny_tokenizer(), DataConfig(max_length=MAX_LENGTH))
    assert len({tuple(ex["input_ids"]) for ex in examples}) == len(examples)  # distinct, to find them again
    return examples


def batches(examples, pack, epoch=0, batch_size=2, shuffle=True):
    return make_batches(examples, batch_size, pack=pack, max_length=MAX_LENGTH, pad_id=0, seed=7,
                        epoch=epoch, shuffle=shuffle)


def segments(batch):
    """(row, start, end) of every packed example, from the restarting position ids."""
    found = []
    for b, positions in enumerate(batch["position_ids"].tolist()):
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
        found += [(b, s, e) for s, e in zip(starts, starts[1:])]
    return found


def token_losses(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")


def alone_losses(model, example):
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"][1:] + [IGNORE]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")[0]


def test_padded_batches_shift_labels_and_mask_padding(examples):
    out = batches(examples, pack=False, shuffle=False, batch_size=3)
    first = out[0]
    assert set(first) == {"input_ids", "labels", "attention_mask"}
    for b, ex in enumerate(examples[:3]):
        n = len(ex["input_ids"])
        assert first["input_ids"][b, :n].tolist() == ex["input_ids"]
        assert first["labels"][b, :n].tolist() == ex["labels"][1:] + [IGNORE]
        assert first["attention_mask"][b].tolist() == [1] * n + [0] * (first["input_ids"].shape[1] - n)
        assert (first["labels"][b, n:] == IGNORE).all() and (first["input_ids"][b, n:] == 0).all()
    assert first["input_ids"].shape[1] == max(len(ex["input_ids"]) for ex in examples[:3])
    assert sum(b["input_ids"].shape[0] for b in out) == len(examples)


def test_batches_are_deterministic_per_seed_and_epoch(examples):
    for pack in (False, True):
        one, again, other = batches(examples, pack, 0), batches(examples, pack, 0), batches(examples, pack, 1)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(one, again) for k in a)
        assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, other))


def test_packed_layout_whole_examples_restarted_positions_shifted_labels(examples):
    out = batches(examples, pack=True)
    by_ids = {tuple(ex["input_ids"]): ex for ex in examples}
    seen = []
    for batch in out:
        assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
        assert batch["input_ids"].shape[1] <= MAX_LENGTH
        B, T = batch["input_ids"].shape
        assert batch["attention_mask"].shape == (B, 1, T, T) and batch["attention_mask"].dtype == torch.float32
        for b, s, e in segments(batch):
            key = tuple(batch["input_ids"][b, s:e].tolist())
            if key == (0,):  # padding: a one-token block at the end of a row, never a target
                assert batch["labels"][b, s] == IGNORE and (batch["input_ids"][b, s:] == 0).all()
                continue
            ex = by_ids[key]
            seen.append(key)
            assert batch["labels"][b, s:e].tolist() == ex["labels"][1:] + [IGNORE]
            allowed = batch["attention_mask"][b, 0] == 0  # (T, T)
            assert allowed[s:e, s:e].equal(torch.ones(e - s, e - s, dtype=torch.bool).tril())
            assert not allowed[s:e, :s].any() and not allowed[s:e, e:].any()
    assert sorted(seen) == sorted(by_ids)  # every example exactly once, never split
    n_rows = sum(b["input_ids"].shape[0] for b in out)
    assert n_rows < len(examples)  # several examples share a row


def test_pack_lengths_best_fit():
    assert pack_lengths([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack_lengths([8, 8], 8) == [[0], [1]]
    assert pack_lengths([3, 6, 2], 8) == [[0], [1, 2]]  # the tightest row that fits, not the first


def test_example_longer_than_max_length_is_refused(examples):
    with pytest.raises(DataError, match="example 0 has 5 tokens; examples must have 1 to max_length=4"):
        make_batches([{"input_ids": [1] * 5, "labels": [1] * 5}], 1, pack=True, max_length=4, pad_id=0,
                     seed=0, epoch=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_per_token_losses_equal_examples_run_one_by_one(examples, name):
    model = MODELS[name]()
    for batch in batches(examples, pack=True):
        losses = token_losses(model, batch)  # (B, T)
        for b, s, e in segments(batch):
            key = batch["input_ids"][b, s:e].tolist()
            if key != [0]:
                ex = next(ex for ex in examples if ex["input_ids"] == key)
                torch.testing.assert_close(losses[b, s:e], alone_losses(model, ex), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2"])
def test_padded_per_token_losses_equal_examples_run_one_by_one(examples, name):
    model = MODELS[name]()
    batch = batches(examples, pack=False, shuffle=False, batch_size=4)[0]
    losses = token_losses(model, batch)
    for b, ex in enumerate(examples[:4]):
        n = len(ex["input_ids"])
        torch.testing.assert_close(losses[b, :n], alone_losses(model, ex), atol=1e-5, rtol=0)


def test_changing_one_packed_example_does_not_change_its_neighbour():
    model = tiny_llama(vocab_size=vocab(), max_position_embeddings=128)
    first = {"input_ids": list(range(10, 22)), "labels": list(range(10, 22))}
    changed = {"input_ids": list(range(40, 52)), "labels": list(range(40, 52))}
    second = {"input_ids": list(range(60, 70)), "labels": list(range(60, 70))}

    def logits_of_second(example, keep_mask=True):
        [batch] = make_batches([example, second], 1, pack=True, max_length=32, pad_id=0, seed=0, epoch=0,
                               shuffle=False)
        inputs = {k: v for k, v in batch.items() if k != "labels" and (keep_mask or k != "attention_mask")}
        with torch.no_grad():
            return model(**inputs).logits[0, 12:22]

    assert torch.equal(logits_of_second(first), logits_of_second(changed))
    # the same probe with restarted position ids alone (no block mask) does see the neighbour
    assert not torch.allclose(logits_of_second(first, False), logits_of_second(changed, False), atol=1e-3)


@pytest.mark.parametrize("name", ["llama-sdpa", "llama-eager", "gpt2", "qwen2"])
def test_check_packing_accepts_supported_models(name):
    check_packing(MODELS[name]())


class MaskDroppingModel(torch.nn.Module):
    """A model whose attention ignores the 4D mask: packing with it would leak."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, position_ids=position_ids)


def test_check_packing_detects_a_model_that_ignores_the_mask():
    model = MaskDroppingModel(tiny_llama(vocab_size=vocab(), max_position_embeddings=128)).train()
    with pytest.raises(DataError, match="packing is not leak-free for model type 'llama'"):
        check_packing(model)
    assert model.training  # the probe restores the model's mode


def test_pack_balanced_uses_best_fit_rows_and_pads_less():
    """auto's layout packs a micro-batch into as few rows as best-fit, balanced: 8 examples of 1,160 tokens in
    rows of 1,024 go into two rows of 595 and 565 instead of 1,015 and 145 (padded to 1,015)."""
    lengths = [145, 200, 90, 300, 100, 180, 60, 85]
    fitted = pack_lengths(lengths, 1024)
    balanced = pack_balanced(lengths, 1024)
    assert len(fitted) == len(balanced) == 2
    assert sorted(sum(lengths[i] for i in row) for row in balanced) == [565, 595]
    assert max(sum(lengths[i] for i in row) for row in fitted) == 1015
    assert balanced == [[0, 2, 3, 6], [1, 4, 5, 7]]  # indices keep their order within a row
    assert pack_balanced([10, 20], 64) == [[0, 1]]  # one row: nothing to balance
    rng = random.Random(0)
    for _ in range(300):  # every index once, rows within max_length, never wider than best-fit's
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 12))]
        limit = rng.choice([300, 512, 1024])
        rows = pack_balanced(lengths, limit)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert len(rows) == len(pack_lengths(lengths, limit))
        width = max(sum(lengths[i] for i in row) for row in rows)
        assert width <= limit and width <= max(sum(lengths[i] for i in row) for row in pack_lengths(lengths, limit))
