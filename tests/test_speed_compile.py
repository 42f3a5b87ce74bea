"""Compiled decoder layers (TrainConfig.compile) against the plain eager model: equal losses."""
from __future__ import annotations

import pytest
import torch

from _tol import TINY, tol
from conftest import tiny_llama
from lorakit.adapters import LoRA, apply
from lorakit.train.config import TrainConfig
from lorakit.train.precision import PRECISIONS
from lorakit.train.setup import compiled_layers, decoder_layers, prepared
from lorakit.train.step import make_loss_sum
from test_speed_loss import packed_batch


def adapted_llama() -> torch.nn.Module:
    return apply(tiny_llama(seed=3), LoRA(r=4, alpha=8, targets="all-linear"))


def test_decoder_layers_finds_the_repeated_blocks():
    model = tiny_llama()
    assert decoder_layers(model) is model.model.layers


@pytest.mark.timeout(120)
def test_compiled_layers_give_the_plain_losses_and_are_undone_after(one_thread):
    torch._dynamo.reset()
    model = adapted_llama()
    loss_of = make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"])
    widths = [packed_batch(seed) for seed in (0, 1, 2)]  # packed batches of different widths
    plain = [loss_of(batch) for batch in widths]
    with compiled_layers(model, backend="aot_eager") as call:  # inductor codegen takes minutes on 2 cores
        assert call is model  # layers compiled in place; the model is called as before
        compiled_loss = make_loss_sum(call, torch.device("cpu"), PRECISIONS["fp32"], chunked=True)
        compiled = [compiled_loss(batch) for batch in widths]
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    for got, expected in zip(compiled, plain):
        torch.testing.assert_close(got, expected, **tol(reduction=TINY))


def test_prepared_compiles_layers_only_when_asked():
    model = adapted_llama()
    with prepared(model, TrainConfig(compile=False)) as call:
        assert call is model and all(layer._compiled_call_impl is None for layer in model.model.layers)
