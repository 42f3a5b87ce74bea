"""Bottleneck and MoLE adapters as named adapters (adapters.multi): switched by name and chosen per
row on one base model, each equal to the same folder loaded alone with load_adapter (prompt tuning:
test_adapters_named_prompt.py)."""
from __future__ import annotations

import pytest
import torch
from _tol import TINY, tol
from conftest import tiny_batch, tiny_llama

from lorakit.adapters import Bottleneck, LoRA, MoLE, apply, load_adapter, save_adapter
from lorakit.adapters.multi import add_adapter, adapter_rows, delete_adapter, set_adapter


def _saved(tmp_path, name: str, cfg, seed: int):
    model = apply(tiny_llama(), cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_adapter(model, tmp_path / name)


@pytest.fixture
def folders(tmp_path):
    return {"neck": _saved(tmp_path, "neck", Bottleneck(size=4, placement="both", activation="gelu"), 1),
            "mole": _saved(tmp_path, "mole", MoLE(r=2, num_experts=3, top_k=2), 2),
            "lora": _saved(tmp_path, "lora", LoRA(r=2, targets=["q_proj", "v_proj"]), 3)}


def test_named_bottleneck_and_mole_adapters_switch_and_mix_per_row(folders):
    ids = tiny_batch(batch=3, length=6)
    alone = {name: load_adapter(tiny_llama(), folder)(input_ids=ids).logits for name, folder in folders.items()}
    base = tiny_llama()(input_ids=ids).logits
    model = tiny_llama()
    for name, folder in folders.items():
        add_adapter(model, name, folder)
    for name in folders:
        set_adapter(model, name)
        torch.testing.assert_close(model(input_ids=ids).logits, alone[name], **tol(reduction=TINY))
    set_adapter(model, None)
    assert torch.equal(model(input_ids=ids).logits, base)
    with adapter_rows(model, ["neck", None, "mole"]):
        mixed = model(input_ids=ids).logits
    for row, expected in enumerate([alone["neck"], base, alone["mole"]]):
        torch.testing.assert_close(mixed[row], expected[row], **tol(reduction=TINY))
    with adapter_rows(model, ["lora", "neck", "lora"]):  # LoRA beside a bottleneck in one batch
        mixed = model(input_ids=ids).logits
    for row, expected in enumerate([alone["lora"], alone["neck"], alone["lora"]]):
        torch.testing.assert_close(mixed[row], expected[row], **tol(reduction=TINY))
    with adapter_rows(model, ["lora", None, "lora"]):  # LoRA rows only: the bottleneck's hooks stay idle
        mixed = model(input_ids=ids).logits
    for row, expected in enumerate([alone["lora"], base, alone["lora"]]):
        torch.testing.assert_close(mixed[row], expected[row], **tol(reduction=TINY))
    delete_adapter(model, "neck")
    set_adapter(model, "mole")
    torch.testing.assert_close(model(input_ids=ids).logits, alone["mole"], **tol(reduction=TINY))

