"""LoRA dropout's CPU mask: nn.Dropout's meaning, seeded, independent per element and per layer,
and the same under torch.compile as in eager mode."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorakit.adapters.dropout import LoRADropout, keep_mask, lora_dropout, rounded_p
from lorakit.adapters.layers import LoRALayer

OWNER = torch.empty(0)


def _within(fraction: float, expected: float, n: int, sigmas: float = 6.0) -> bool:
    return abs(fraction - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_kept_elements_are_scaled_and_the_keep_rate_is_one_minus_p(p):
    torch.manual_seed(0)
    x = torch.randn(1000, 1000)
    y = lora_dropout(x, p, OWNER)
    kept = y != 0
    scale = 1 / (1 - rounded_p(p))
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=0, atol=0)
    assert _within(kept.float().mean().item(), 1 - rounded_p(p), x.numel())
    assert abs(rounded_p(p) - p) <= 2 ** -17


def test_each_of_the_four_lanes_of_a_random_word_and_neighbouring_elements_are_independent():
    torch.manual_seed(1)
    n, p = 4_000_000, 0.25
    keep = keep_mask(torch.empty(n), p, OWNER)
    for lane in range(4):  # the 16-bit slices of each 64-bit draw
        assert _within(keep[lane::4].float().mean().item(), 1 - p, n // 4), lane
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert _within(both, (1 - p) ** 2, n - 1)
    across_words = (keep[3:-4:4] & keep[4::4]).float().mean().item()  # last lane of a word, first of the next
    assert _within(across_words, (1 - p) ** 2, n // 4 - 1)


def test_the_mask_follows_the_seed_and_changes_between_calls():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    first, second = lora_dropout(x, 0.3, OWNER), lora_dropout(x, 0.3, OWNER)
    torch.manual_seed(3)
    assert torch.equal(lora_dropout(x, 0.3, OWNER), first)
    assert not torch.equal(first != 0, second != 0)


def test_eval_mode_and_p_zero_return_the_input_and_gradients_flow_through_kept_elements():
    x = torch.randn(8, 16, requires_grad=True)
    layer = LoRADropout(0.5)
    layer.eval()
    assert layer(x) is x and lora_dropout(x, 0.0, OWNER) is x
    layer.train()
    torch.manual_seed(0)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)
    assert isinstance(layer, nn.Dropout) and repr(layer) == "LoRADropout(p=0.5, inplace=False)"


def test_bf16_inputs_keep_their_dtype():
    torch.manual_seed(0)
    x = torch.randn(128, 64, dtype=torch.bfloat16)
    y = lora_dropout(x, 0.1, OWNER)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - rounded_p(0.1))))


def test_lora_layers_use_it_and_compiled_layers_draw_the_same_masks_as_eager_ones():
    torch.manual_seed(0)
    q = LoRALayer(nn.Linear(32, 32).requires_grad_(False), r=4, alpha=8, dropout=0.2)
    v = LoRALayer(nn.Linear(32, 32).requires_grad_(False), r=4, alpha=8, dropout=0.2)
    assert isinstance(q.lora_dropout, LoRADropout)
    for layer in (q, v):
        nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 32)

    def two_projections(x):  # the same input tensor feeds both, as q and v in attention
        return q(x), v(x)

    def run(fn):
        for layer in (q, v):
            layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        outputs = fn(x)
        sum(o.square().sum() for o in outputs).backward()  # the backward pass must reuse each forward mask
        return outputs, [p.grad.clone() for layer in (q, v) for p in (layer.lora_A.weight, layer.lora_B.weight)]

    eager, eager_grads = run(two_projections)
    compiled, compiled_grads = run(torch.compile(two_projections, dynamic=False))
    for a, b in zip([*eager, *eager_grads], [*compiled, *compiled_grads]):
        torch.testing.assert_close(a, b)
    torch.manual_seed(7)  # the same stream drawn by hand: q's mask, then v's, different from each other
    masks = [keep_mask(x, 0.2, OWNER), keep_mask(x, 0.2, OWNER)]
    assert not torch.equal(*masks)
    scale = 1 / (1 - rounded_p(0.2))
    for layer, mask, out in zip((q, v), masks, compiled):
        expected = nn.functional.linear(x, layer.weight, layer.bias) + \
            (x * mask * scale) @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scaling
        torch.testing.assert_close(out.detach(), expected.detach())
