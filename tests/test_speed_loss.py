"""The chunked cross-entropy (lorakit.train.fastloss) against the plain logits path.

Parity: equal summed loss and equal gradients (adapter weights, and a trainable tied head) on
tiny models; the fallback for heads it cannot stand in for; and a guard that the chunked
training step never materialises a full-vocabulary logits tensor.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _tol import TINY, tol
from conftest import VOCAB, tiny_bloom, tiny_gpt2, tiny_llama
from lorakit.adapters import LoRA, apply
from lorakit.data.batching import make_batches
from lorakit.train.fastloss import chunked_loss_sum, split_head
from lorakit.train.precision import PRECISIONS
from lorakit.train.step import make_loss_sum


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """One packed batch of random examples: half the positions untrained (prompt), some padding."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in (9, 14, 6, 11, 13, 5):
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return make_batches(examples, 2, pack=True, max_length=32, pad_id=0, seed=seed, epoch=0)[0]


def loss_and_grads(model: torch.nn.Module, chunked: bool, batch: dict, precision: str = "fp32"):
    model.zero_grad(set_to_none=True)
    loss = make_loss_sum(model, torch.device("cpu"), PRECISIONS[precision], chunked=chunked)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_chunked_loss_equals_plain_loss_and_adapter_gradients(build):
    model = apply(build(seed=1), LoRA(r=4, alpha=8, targets="all-linear"))
    for name, param in model.named_parameters():  # B = 0 would hide gradient errors through B
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = packed_batch()
    plain_loss, plain_grads = loss_and_grads(model, chunked=False, batch=batch)
    fast_loss, fast_grads = loss_and_grads(model, chunked=True, batch=batch)
    torch.testing.assert_close(fast_loss, plain_loss, **tol(reduction=TINY))
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], msg=name, **tol(reduction=TINY))


def test_chunked_loss_gives_a_trainable_tied_head_its_gradient():
    model = tiny_gpt2(seed=2)  # eval mode (no dropout); full fine-tuning: lm_head is the (trainable) embedding matrix
    batch = packed_batch(seed=3)
    plain_loss, plain_grads = loss_and_grads(model, chunked=False, batch=batch)
    fast_loss, fast_grads = loss_and_grads(model, chunked=True, batch=batch)
    torch.testing.assert_close(fast_loss, plain_loss, **tol(reduction=TINY))
    torch.testing.assert_close(fast_grads["transformer.wte.weight"], plain_grads["transformer.wte.weight"],
                               **tol(reduction=TINY))


def test_chunks_of_any_size_give_the_same_sum():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=generator, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[0, :3] = -100
    plain = torch.nn.functional.cross_entropy(head(hidden).reshape(-1, 50), labels.reshape(-1), reduction="sum")
    for rows in (1, 4, 100):
        torch.testing.assert_close(chunked_loss_sum(hidden, head, labels, rows=rows), plain, **tol(reduction=50))


def test_bf16_chunked_loss_is_close_to_the_plain_bf16_loss():
    model = apply(tiny_llama(seed=1), LoRA(r=4, alpha=8, targets="all-linear"))
    PRECISIONS["bf16"].prepare(model)
    batch = packed_batch(seed=4)
    plain, _ = loss_and_grads(model, chunked=False, batch=batch, precision="bf16")
    fast, _ = loss_and_grads(model, chunked=True, batch=batch, precision="bf16")
    torch.testing.assert_close(fast, plain, **tol(torch.bfloat16))


def test_heads_it_cannot_stand_in_for_use_the_plain_path():
    assert split_head(tiny_bloom()) is None  # model type outside LM_HEADS
    softcapped = tiny_llama()
    softcapped.config.final_logit_softcapping = 30.0
    assert split_head(softcapped) is None
    adapted_head = apply(tiny_llama(), LoRA(r=2, alpha=4, targets=["lm_head"]))
    assert split_head(adapted_head) is None  # the head is a LoRALayer, not a plain Linear
    assert split_head(tiny_llama()) is not None


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows any op output had with `vocab` in its last dimension."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.max_rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("t", "transpose", "permute"):  # a view of the (V, C) head weight
            return out
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(tensor) and tensor.dim() >= 1 and tensor.shape[-1] == self.vocab:
                self.max_rows = max(self.max_rows, tensor.numel() // self.vocab)
        return out


def test_the_chunked_step_never_builds_full_vocabulary_logits(monkeypatch):
    import lorakit.train.fastloss as fastloss

    monkeypatch.setattr(fastloss, "CHUNK_ELEMENTS", 4 * VOCAB)  # 4 positions per chunk
    model = apply(tiny_llama(vocab_size=VOCAB, max_position_embeddings=64), LoRA(r=4, alpha=8, targets="all-linear"))
    batch = packed_batch(seed=5)
    positions = batch["input_ids"].numel()
    for chunked, limit in ((False, positions), (True, 4)):
        spy = LargestVocabTensor(VOCAB)
        loss_sum = make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"], chunked=chunked)
        with spy:
            loss_sum(batch).backward()
        # the plain path builds (B*T, V) logits; the chunked one never more than a chunk of rows
        assert spy.max_rows == limit, (chunked, spy.max_rows)
