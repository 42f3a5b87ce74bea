"""Prompt tuning (Lester et al. 2021): peft PROMPT_TUNING parity in both directions, logits
aligned with the caller's tokens, generation with the KV cache, text init, errors, training."""
from __future__ import annotations

import json

import pytest
import torch
from _tol import TINY, tol
from conftest import tiny_batch, tiny_bloom, tiny_gpt2, tiny_llama
from _method_runs import losses, make_workdir, run_method
from _tiny import tiny_tokenizer
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model

from lorakit.adapters import (PromptTuning, apply, load_adapter, merge, save_adapter, trainable_parameters,
                              unload)
from lorakit.errors import AdapterError, ConfigError
from lorakit.infer.generate import greedy_generate

N = 3
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bloom": tiny_bloom}


def _padded_batch():
    ids = tiny_batch(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding on row 1
    return ids, mask


def _with_trained_prompt(model):
    with torch.no_grad():
        model.lorakit_prompt.embeddings.copy_(torch.randn(model.lorakit_prompt.embeddings.shape,
                                                          generator=torch.Generator().manual_seed(3)))
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_folder_loads_into_lorakit_with_equal_logits(arch, tmp_path):
    ids, mask = _padded_batch()
    peft_model = get_peft_model(BUILDERS[arch](), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = peft_model(input_ids=ids, attention_mask=mask).logits[:, N:]  # peft keeps the virtual positions
    model = load_adapter(BUILDERS[arch](), tmp_path / "peft")
    got = model(input_ids=ids, attention_mask=mask).logits
    assert got.shape == ids.shape + (model.config.vocab_size,)
    torch.testing.assert_close(got, expected, **tol(reduction=TINY))


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_lorakit_folder_loads_into_peft_with_equal_logits(arch, tmp_path):
    ids, mask = _padded_batch()
    model = _with_trained_prompt(apply(BUILDERS[arch](), PromptTuning(num_virtual_tokens=N)))
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", N, 32)
    peft_model = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours").eval()
    expected = peft_model(input_ids=ids, attention_mask=mask).logits[:, N:]
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, **tol(reduction=TINY))
    reloaded = load_adapter(BUILDERS[arch](), tmp_path / "ours")
    assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)


def test_text_init_matches_peft(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    text = "Answer the question."
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=11, prompt_tuning_init=PromptTuningInit.TEXT,
                             prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "tok"))
    peft_model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), cfg)
    expected = peft_model.prompt_encoder["default"].embedding.weight
    model = apply(tiny_llama(vocab_size=len(tokenizer)),
                  PromptTuning(num_virtual_tokens=11, init_from="text", init_text=text,
                               tokenizer_name_or_path=str(tmp_path / "tok")))
    assert torch.equal(model.lorakit_prompt.embeddings, expected)


def _greedy_without_cache(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """The oracle: recompute the whole sequence (virtual tokens included) for every new token."""
    ids, new = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax()
            if token.item() == eos:
                break
            new.append(token.item())
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return new


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_generation_with_cache_equals_full_recompute(arch):
    """greedy_generate (HF generate) and lorakit's decode loop (KV cache, left padding, position ids)
    pick the tokens a cache-free loop picks."""
    from lorakit.decoding.decode import decode
    from lorakit.decoding.sampling import Sampling

    tokenizer = tiny_tokenizer()
    model = _with_trained_prompt(apply(BUILDERS[arch](vocab_size=len(tokenizer)), PromptTuning(num_virtual_tokens=N)))
    prompts = ["Hello world.", "Question: what is two plus two?"]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    expected = [_greedy_without_cache(model, ids, 5, tokenizer.eos_token_id) for ids in encoded]
    assert sum(map(len, expected)) >= 5  # real continuations, not an immediate end of sequence
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=5)
    assert texts == [tokenizer.decode(new, skip_special_tokens=True) for new in expected]
    got = decode(model, encoded, [Sampling()] * 2, max_new_tokens=[5, 5], stop_ids={tokenizer.eos_token_id},
                 pad_id=tokenizer.pad_token_id)
    assert got == expected


def test_parameters_merge_unload_and_packing():
    ids, mask = _padded_batch()
    base_logits = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    model = apply(tiny_llama(), PromptTuning(num_virtual_tokens=5))
    trainable, total = trainable_parameters(model)
    assert trainable == 5 * 32 and total == sum(p.numel() for p in tiny_llama().parameters()) + 5 * 32
    with pytest.raises(AdapterError, match="prompt tuning cannot be merged"):
        merge(model)
    packed_mask = torch.zeros(2, 1, 6, 6)
    with pytest.raises(AdapterError, match=r"prompt tuning cannot run on packed batches \(a 4-D attention mask\)"):
        model(input_ids=ids, attention_mask=packed_mask)
    plain = unload(model)
    assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, base_logits)
    assert not plain._forward_pre_hooks and not plain._forward_hooks and not hasattr(plain, "lorakit_prompt")


@pytest.mark.parametrize("fields,message", [
    ({"num_virtual_tokens": 0}, "method.num_virtual_tokens: must be > 0 (got 0)"),
    ({"init_from": "vocab"}, "method.init_from: must be one of random, text (got 'vocab')"),
    ({"init_from": "text"}, "method.init_text: must be a non-empty text when init_from is 'text' (got None)"),
])
def test_bad_configs_are_named(fields, message):
    with pytest.raises(ConfigError) as error:
        PromptTuning(**fields)
    assert str(error.value) == message


def test_lorakit_train_with_method_prompt_tuning(tmp_path, one_thread):
    root = make_workdir(tmp_path)
    result = run_method(root, {"name": "prompt_tuning", "num_virtual_tokens": 4}, steps=10, lr=1e-1)
    curve = losses(result.run_dir)  # full-batch steps on the same rows
    assert curve[-1] < curve[0] - 0.2
    assert json.loads((result.output / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    base = PeftModel.from_pretrained(__import__("lorakit").load_model(str(root / "base")), result.output).eval()
    ids = tiny_batch(length=6)
    result.model.eval()
    torch.testing.assert_close(result.model(input_ids=ids).logits, base(input_ids=ids).logits[:, 4:],
                               **tol(reduction=TINY))


def test_chunked_loss_option_keeps_the_virtual_tokens():
    """train.chunked_loss runs the backbone directly; with prompt tuning it must fall back to the
    model's own (hooked) forward, so the loss still sees the virtual tokens."""
    from lorakit.train.precision import PRECISIONS
    from lorakit.train.step import make_loss_sum

    model = _with_trained_prompt(apply(tiny_llama(), PromptTuning(num_virtual_tokens=N)))
    ids = tiny_batch()
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
    plain = make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"])(batch)
    chunked = make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"], chunked=True)(batch)
    assert torch.equal(chunked, plain)
