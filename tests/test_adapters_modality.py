"""The modality adapter (adapters/modality.py): text rows bit for bit the base in a mixed batch, image rows reached
by their soft tokens and their modality's LoRA only, gradients to the adapter only, save/load, merge refused."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

import lorakit
from lorakit.adapters import adapters_disabled, apply, load_adapter, merge, save_adapter, unload
from lorakit.adapters.modality import CHILD, RoutedLoRALayer
from lorakit.errors import AdapterError, ConfigError
from lorakit.media import positions_key, values_key
from lorakit.models import load_model

SMALL = {"image_size": 16, "patch_size": 4, "width": 16, "depth": 1, "heads": 2, "num_tokens": 4, "r": 4}
TEXT_ROWS, IMAGE_ROWS = [0, 2], [1, 3]


def _models():
    return {"embedded": lambda: load_model("embedded").eval(), "tiny-llama": tiny_llama}


def _adapted(build, modalities=None, seed: int = 0):
    """`build()` with a modality adapter whose LoRA B is random (a fresh B is zero: the LoRA would add nothing)."""
    model = apply(build(), lorakit.Modality(modalities=modalities or {"image": SMALL}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _batch(vocab: int, names=("image",), seed: int = 0) -> dict[str, torch.Tensor]:
    """4 rows of 14 tokens: rows 0 and 2 text (row 2 right-padded), rows 1 and 3 an item of each modality."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 14), generator=generator)
    mask = torch.ones(4, 14, dtype=torch.long)
    mask[2, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    for offset, name in enumerate(names):
        values = torch.zeros(4, 1, 3, 16, 16, dtype=torch.uint8)
        positions = torch.full((4, 1), -1)
        for row in IMAGE_ROWS:
            values[row, 0] = torch.randint(0, 256, (3, 16, 16), generator=generator, dtype=torch.uint8)
            positions[row, 0] = 1 + 5 * offset + row
        batch[values_key(name)], batch[positions_key(name)] = values, positions
    return batch


@pytest.mark.parametrize("name", ["embedded", "tiny-llama"])
def test_text_rows_are_bitwise_the_base_in_a_mixed_batch(name):
    build = _models()[name]
    model = _adapted(build)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        plain = build()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        on = model(**batch).logits
        with adapters_disabled(model):
            off = model(**batch).logits
    assert torch.equal(on[TEXT_ROWS], off[TEXT_ROWS])  # the same batch with the modality adapter switched off
    assert torch.equal(on[TEXT_ROWS], plain[TEXT_ROWS])  # and the model before apply
    assert torch.equal(off, plain)  # switched off, image rows too see their placeholder ids only
    assert all((on[row] - off[row]).abs().amax() > 1e-2 for row in IMAGE_ROWS)


def test_gradients_reach_the_encoder_projector_and_lora_only():
    model = _adapted(tiny_llama)
    batch = _batch(model.config.vocab_size)
    logits = model(**batch).logits
    logits[IMAGE_ROWS].logsumexp(-1).sum().backward()
    adapter = {n: p for n, p in model.named_parameters() if n.startswith(CHILD) or ".lora_" in n}
    assert adapter and all(p.requires_grad for p in adapter.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.items()), \
        [n for n, p in adapter.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(not p.requires_grad and p.grad is None for n, p in model.named_parameters() if n not in adapter)
    model.zero_grad(set_to_none=True)
    model(**batch).logits[TEXT_ROWS].logsumexp(-1).sum().backward()  # text rows: nothing of the adapter is used
    assert all(p.grad is None or not p.grad.any() for p in adapter.values())


def test_two_modalities_each_reach_only_the_rows_that_carry_them():
    """Row 1 carries an image, row 3 a sketch (two encoders, two LoRAs in one batch); zeroing one modality's LoRA
    changes only the rows of that modality."""
    model = _adapted(tiny_llama, {"image": SMALL, "sketch": SMALL})
    batch = _batch(model.config.vocab_size, names=("image", "sketch"))
    batch[positions_key("image")][3] = -1
    batch[positions_key("sketch")][1] = -1
    with torch.no_grad():
        both = model(**batch).logits
        for layer in (m for m in model.modules() if isinstance(m, RoutedLoRALayer)):
            layer.lora_B["sketch"].zero_()
        no_sketch = model(**batch).logits
        with adapters_disabled(model):
            off = model(**batch).logits
    assert torch.equal(both[[0, 1, 2]], no_sketch[[0, 1, 2]]) and (both[3] - no_sketch[3]).abs().amax() > 1e-3
    assert torch.equal(both[TEXT_ROWS], off[TEXT_ROWS]) and (both[1] - off[1]).abs().amax() > 1e-3


def test_save_load_round_trip_merge_refused_unload_restores_the_base(tmp_path):
    model = _adapted(tiny_llama)
    batch = _batch(model.config.vocab_size)
    folder = save_adapter(model, tmp_path / "adapter", "tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lorakit_method"] == "modality" and config["config"]["modalities"]["image"]["num_tokens"] == 4
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.lora_A.image" in tensors
    assert f"{CHILD}.branches.image.encoder.patch.weight" in tensors and any(".projector." in k for k in tensors)
    loaded = load_adapter(tiny_llama(), folder)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    with pytest.raises(AdapterError, match=r"^a routed modality adapter cannot be merged into the base: its LoRA is "
                                           r"active only for rows that carry its modality"):
        merge(loaded)
    plain = unload(loaded)
    assert not hasattr(plain, CHILD) and not plain._forward_pre_hooks
    with torch.no_grad():
        text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        assert torch.equal(plain(**text).logits, tiny_llama()(**text).logits)


def test_count_on_a_meta_skeleton_and_config_errors():
    from transformers import AutoModelForCausalLM

    method = lorakit.Modality(modalities={"image": SMALL})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny_llama().config)
    assert sum(lorakit.count(skeleton, method).values()) == lorakit.trainable_parameters(apply(tiny_llama(), method))[0]
    with pytest.raises(ConfigError, match=r"^method.modalities.num_tokens: must be at most the 16 "
                                                         r"patches of a 16px image \(patch_size 4\) \(got 17\)$"):
        lorakit.Modality(modalities={"image": {**SMALL, "num_tokens": 17}})
    with pytest.raises(ConfigError, match=r"^method.modalities.kind: must be one of image"):
        lorakit.Modality(modalities={"audio": {"kind": "audio"}})


def test_decoding_puts_the_soft_tokens_where_a_batch_forward_does():
    """decode() inside media_rows (left-padded prompts, KV cache, a text row beside an image row) gives each row the
    greedy tokens of a plain forward loop over that row alone with the batch keys."""
    from lorakit.adapters.modality import media_rows
    from lorakit.decoding.decode import decode
    from lorakit.decoding.sampling import Sampling

    model = _adapted(tiny_llama)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    item = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    media = [[("image", 2, item)], None]  # the shorter prompt: left-padded, its item moves with it
    with torch.no_grad(), media_rows(model, media):
        new = decode(model, prompts, [Sampling()] * 2, max_new_tokens=[4, 4], stop_ids=set(), pad_id=0)
    for row, prompt in enumerate(prompts):
        ids = list(prompt)
        for _ in range(4):
            batch = {"input_ids": torch.tensor([ids])}
            if media[row]:
                batch[values_key("image")], batch[positions_key("image")] = item[None, None], torch.tensor([[2]])
            with torch.no_grad():
                ids.append(int(model(**batch).logits[0, -1].argmax()))
        assert new[row] == ids[len(prompt):]


def test_ablations_projector_only_and_a_lora_shared_by_every_row():
    """r: 0 leaves the soft tokens alone (no LoRA anywhere); lora_rows: all is the shared-LoRA baseline, which
    reaches text rows too (the routed default is what keeps them exact)."""
    batch = _batch(tiny_llama().config.vocab_size)
    projector_only = _adapted(tiny_llama, {"image": {**SMALL, "r": 0}})
    assert not any(isinstance(m, RoutedLoRALayer) for m in projector_only.modules())
    shared = _adapted(tiny_llama, {"image": {**SMALL, "lora_rows": "all"}})
    with torch.no_grad():
        outputs = []
        for model in (projector_only, shared):
            on = model(**batch).logits
            with adapters_disabled(model):
                outputs.append((on, model(**batch).logits))
    (on, off), (shared_on, shared_off) = outputs
    assert torch.equal(on[TEXT_ROWS], off[TEXT_ROWS]) and (on[1] - off[1]).abs().amax() > 1e-3
    assert all((shared_on[row] - shared_off[row]).abs().amax() > 1e-3 for row in range(4))
