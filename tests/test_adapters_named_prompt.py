"""Prompt-tuning adapters as named adapters (adapters.multi): switched by name beside LoRA ones and
mixed per row, each equal to the same folder loaded alone with load_adapter (logits and generation)."""
from __future__ import annotations

import pytest
import torch
from _tol import TINY, tol
from _infer_fixtures import check_rows_decode_alone, random_adapter
from _tiny import CHATML, tiny_tokenizer
from conftest import TINY_MODELS, tiny_batch
from fastapi.testclient import TestClient
from peft import PromptTuningConfig, get_peft_model

from lorakit.adapters import PromptTuning, apply, load_adapter, save_adapter
from lorakit.adapters.multi import adapter_names, adapter_rows, add_adapter, delete_adapter, set_adapter
from lorakit.infer.generate import generate_texts, greedy_generate

VOCAB = 320  # the tiny tokenizer's vocabulary


@pytest.fixture(params=sorted(TINY_MODELS))
def arch(request):
    return request.param


def _prompt_folder(build, folder, n: int, seed: int):
    """A lorakit-saved prompt-tuning folder with random (trained-looking) virtual tokens."""
    model = apply(build(), PromptTuning(num_virtual_tokens=n))
    table = model.lorakit_prompt.embeddings
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
    return save_adapter(model, folder)


def _folders(build, tmp_path) -> dict:
    """Two prompts of different lengths and a LoRA adapter, all for `build`'s base."""
    return {"p3": _prompt_folder(build, tmp_path / "p3", 3, 1), "p5": _prompt_folder(build, tmp_path / "p5", 5, 2),
            "lora": random_adapter(build, tmp_path / "lora", 0)}


def _loaded(build, folders: dict):
    model = build()
    for name, folder in folders.items():
        add_adapter(model, name, folder)
    return model


def _alone(build, folder):
    return build() if folder is None else load_adapter(build(), folder)


@torch.no_grad()
def test_switching_by_name_equals_each_folder_alone(arch, tmp_path, one_thread):
    build = TINY_MODELS[arch]
    folders = _folders(build, tmp_path)
    model = _loaded(build, folders)
    ids = tiny_batch(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding on row 1
    for name in ["p3", "lora", "p5", "p3"]:
        set_adapter(model, name)
        expected = _alone(build, folders[name])(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    set_adapter(model, None)
    base = build()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


@torch.no_grad()
def test_peft_saved_prompt_folder_is_a_named_adapter(tmp_path):
    build = TINY_MODELS["llama"]
    peft_model = get_peft_model(build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft_model.save_pretrained(tmp_path / "peft")
    model = build()
    add_adapter(model, "peft", tmp_path / "peft")
    set_adapter(model, "peft")
    ids = tiny_batch(batch=2, length=5)
    assert torch.equal(model(input_ids=ids).logits, load_adapter(build(), tmp_path / "peft")(input_ids=ids).logits)


@torch.no_grad()
def test_rows_mixing_prompts_lora_and_base_equal_each_alone(arch, tmp_path, one_thread):
    """Per row: every row gets a front as wide as the longest prompt; rows with a shorter prompt or none have
    the rest masked out (with or without a caller mask), and each row equals its adapter alone."""
    build = TINY_MODELS[arch]
    folders = _folders(build, tmp_path)
    model = _loaded(build, folders)
    ids = tiny_batch(batch=5, length=6)
    rows = ["p3", None, "lora", "p5", "p3"]
    left = torch.ones_like(ids)
    left[1, :2] = left[3, :1] = 0  # left padding on rows 1 and 3
    for mask in (None, left):
        with adapter_rows(model, rows):
            mixed = model(input_ids=ids, **_padding(arch, mask)).logits
        for row, name in enumerate(rows):
            row_mask = None if mask is None else mask[row:row + 1]
            alone = _alone(build, folders.get(name))(input_ids=ids[row:row + 1], **_padding(arch, row_mask)).logits
            real = slice(None) if mask is None else mask[row].bool()
            torch.testing.assert_close(mixed[row][real], alone[0][real], **tol(reduction=TINY))
    assert not torch.allclose(mixed[0], build()(input_ids=ids[:1]).logits[0], atol=1e-3)  # the prompt counts


def _padding(arch: str, mask):
    """attention_mask and, where the model takes them, position ids counting real tokens only (as decode does)."""
    if mask is None:
        return {}
    return {"attention_mask": mask} if arch == "bloom" else {"attention_mask": mask,
                                                               "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def test_rows_mixing_prompts_generate_what_each_generates_alone(arch, tmp_path, one_thread):
    """lorakit's decode loop (KV cache, left padding, rows leaving the batch) per row equals each folder alone."""
    build = TINY_MODELS[arch]
    folders = _folders(build, tmp_path)
    model = _loaded(build, folders)
    prompts = [[5, 9, 11], [7, 3], [4, 4, 8, 20, 6], [30], [8, 9]]
    rows = ["p5", "p3", None, "lora", "p3"]
    budgets = [2, 3, 8, 1, 5]  # prompt rows leave first, the base row goes on last: the cache keeps their front
    check_rows_decode_alone(model, rows, lambda name: _alone(build, folders.get(name)), prompts, budgets)


@torch.no_grad()
def test_cached_steps_without_mask_or_positions_equal_each_alone(arch, tmp_path):
    """Rows of different fronts and no caller mask: the hooks make the mask (and positions) for the first
    forward and for the steps after it that find the front in the KV cache."""
    build = TINY_MODELS[arch]
    folders = _folders(build, tmp_path)
    model = _loaded(build, folders)
    ids = tiny_batch(batch=3, length=6)
    rows = ["p5", None, "p3"]
    with adapter_rows(model, rows):
        first = model(input_ids=ids[:, :4], use_cache=True)
        second = model(input_ids=ids[:, 4:], cache=first.cache, use_cache=True)
    for row, name in enumerate(rows):
        alone = _alone(build, folders.get(name))
        expected = alone(input_ids=ids[row:row + 1, :4], use_cache=True)
        expected_second = alone(input_ids=ids[row:row + 1, 4:], cache=expected.cache, use_cache=True)
        torch.testing.assert_close(first.logits[row], expected.logits[0], **tol(reduction=TINY))
        torch.testing.assert_close(second.logits[row], expected_second.logits[0], **tol(reduction=TINY))


def test_generation_by_name_equals_load_adapter(tmp_path, one_thread):
    """generate_texts (lorakit's decode loop) and greedy_generate (HF generate, cache positions) with a named
    prompt adapter equal the folder loaded alone; switching to LoRA and to None gives theirs."""
    build = lambda: TINY_MODELS["llama"](vocab_size=VOCAB)  # noqa: E731
    tokenizer = tiny_tokenizer()
    folders = _folders(build, tmp_path)
    model = _loaded(build, folders)
    prompts = ["Hello world.", "Question: what is two plus two?"]
    texts = {}
    for name in ["p5", "lora", None]:
        alone = _alone(build, folders.get(name))
        expected = generate_texts(alone, tokenizer, prompts, max_new_tokens=6, chat=False)
        texts[name] = generate_texts(model, tokenizer, prompts, adapters=[name] * 2, max_new_tokens=6, chat=False)
        assert texts[name] == expected
        set_adapter(model, name)
        assert greedy_generate(model, tokenizer, prompts, max_new_tokens=6) == \
            greedy_generate(alone, tokenizer, prompts, max_new_tokens=6)
    assert texts["p5"] != texts[None]


def test_delete_takes_the_prompt_hooks_off(tmp_path):
    build = TINY_MODELS["llama"]
    folders = _folders(build, tmp_path)
    model = _loaded(build, folders)
    ids = tiny_batch(batch=2, length=5)
    delete_adapter(model, "p3")
    assert adapter_names(model) == ["p5", "lora"] and model._forward_pre_hooks  # p5 still needs them
    set_adapter(model, "p5")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, _alone(build, folders["p5"])(input_ids=ids).logits)
    delete_adapter(model, "p5")
    assert not model._forward_pre_hooks and not model._forward_hooks  # no prompt adapter left: no model hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, build()(input_ids=ids).logits)  # p5 left the plan
    set_adapter(model, "lora")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, _alone(build, folders["lora"])(input_ids=ids).logits)


def test_serve_and_compare_with_a_prompt_adapter(tmp_path, one_thread):
    """The server's per-row batches and `lorakit compare` (base and adapter rows in one batch) take prompt
    adapters, loaded at start or through the admin endpoint."""
    from lorakit.commands.compare import compare
    from lorakit.infer.api import ServerConfig
    from lorakit.infer.server import create_app

    build = lambda: TINY_MODELS["gpt2"](vocab_size=VOCAB)  # noqa: E731
    tokenizer = tiny_tokenizer(CHATML)
    folders = _folders(build, tmp_path)
    model = build()
    add_adapter(model, "p3", folders["p3"])
    app = create_app(model, tokenizer, ServerConfig(context_length=48, window_ms=1, api_key="k"))
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        loaded = client.post("/admin/adapters", json={"name": "p5", "path": str(folders["p5"])}, headers=auth)
        assert loaded.json()["models"] == ["base", "p3", "p5"]
        for name in ("p3", "p5", "base"):
            body = {"model": name, "prompt": "Hello world", "max_tokens": 6, "temperature": 0}
            text = client.post("/v1/completions", json=body, headers=auth).json()["choices"][0]["text"]
            alone = _alone(build, folders.get(name))
            assert text == generate_texts(alone, tokenizer, ["Hello world"], chat=False, max_new_tokens=6)[0]
    prompts = ["Hello world", "The quick brown fox"]
    columns = compare(build(), tokenizer, prompts, {"p5": str(folders["p5"]), "lora": str(folders["lora"])},
                      max_new_tokens=5, chat=False)
    for name in ("p5", "lora", None):
        assert columns[name or "base"] == generate_texts(_alone(build, folders.get(name)), tokenizer, prompts,
                                                         max_new_tokens=5, chat=False)
