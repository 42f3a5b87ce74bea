"""The GGUF export run in a real llama.cpp (llama-cpp-python, compiled by scripts/setup_llamacpp.sh): greedy tokens
from llama.cpp equal lorakit's, with the adapter, on the embedded model and on a tiny Llama with grouped-query
attention and a BOS-adding tokenizer.

llama.cpp tokenizes every prompt from the file's own tokenizer metadata; those ids must equal the transformers
tokenizer's, and its detokenized text the tokenizer's decode. `make test` skips this file when llama_cpp is missing
(compiling it takes about 10 minutes on 2 cores); `make test-gguf` sets LORAKIT_REQUIRE_LLAMACPP=1 and compiles it
first, so there a missing llama_cpp fails instead.
"""
from __future__ import annotations

import os
from contextlib import closing

import numpy as np
import pytest
import torch
from _tol import tol
from gguf_fixtures import PROMPTS, embedded_adapter, styled_tokenizer, tiny_llama_adapter, tiny_llama_folder

from lorakit.decoding.decode import decode
from lorakit.decoding.sampling import Sampling
from lorakit.export import export_gguf, export_lora_gguf
from lorakit.infer.generate import load_target, resolve_target

if os.environ.get("LORAKIT_REQUIRE_LLAMACPP") == "1":
    import llama_cpp  # make test-gguf: llama.cpp must be there
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; `make test-gguf` "
                                                        "compiles it and runs this file")
pytest.importorskip("gguf", reason="the 'gguf' extra is not installed")

NEW_TOKENS = 16
F32 = 0  # GGML_TYPE_F32: the KV cache in fp32 (llama.cpp's default is f16)


def quiet(line: str) -> None:
    """Drop the loaders' notes."""


def llama(path, lora=None):
    """llama.cpp on one thread with every position's logits and an fp32 KV cache."""
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_batch=256,
                           n_threads=1, n_threads_batch=1, logits_all=True, type_k=F32, type_v=F32, verbose=False)


def llamacpp_greedy(model, prompt_ids: list[int], steps: int = NEW_TOKENS) -> tuple[list[int], np.ndarray]:
    """(greedy new tokens, logits at each step (steps, vocab)) from llama.cpp, never stopping early."""
    model.reset()
    model.eval(prompt_ids)
    tokens, logits = [], []
    for _ in range(steps):
        last = np.array(model.scores[model.n_tokens - 1], dtype=np.float32)
        logits.append(last)
        tokens.append(int(last.argmax()))
        model.eval([tokens[-1]])
    return tokens, np.stack(logits)


def lorakit_greedy(source) -> tuple[list[list[int]], list[list[int]], list[torch.Tensor], list[float], object]:
    """(prompt ids, greedy new tokens, logits at each step, the logits' term size, tokenizer) of `source` in
    lorakit, the adapter unmerged. The term size is the mean of sum_k |W_vk h_k| over the logits: rounding
    upstream moves a logit in proportion to its terms, not to the logit itself, which may cancel below them."""
    model, tokenizer = load_target(resolve_target(source), dtype="float32", log=quiet)
    prompt_ids = [list(tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    new = decode(model, prompt_ids, [Sampling()] * len(PROMPTS), max_new_tokens=[NEW_TOKENS] * len(PROMPTS),
                 stop_ids=set(), pad_id=tokenizer.pad_token_id)
    head = model.get_output_embeddings().weight  # (vocab, hidden)
    logits, sizes = [], []
    with torch.no_grad():
        for ids, out in zip(prompt_ids, new):
            result = model(torch.tensor([ids + out]), output_hidden_states=True)
            steps = slice(len(ids) - 1, len(ids) + len(out) - 1)
            logits.append(result.logits[0, steps])
            final = result.hidden_states[-1][0, steps]  # after the final norm: logits = final @ head.T
            sizes.append(float((final.abs() @ head.abs().T).mean()))
    return prompt_ids, new, logits, sizes, tokenizer


def check_same_tokens(gguf_path, source, lora=None, reduction: int = 512) -> None:
    """llama.cpp's tokenization and greedy tokens equal lorakit's, its fp32 logits within fp32 rounding."""
    prompt_ids, expected, expected_logits, sizes, tokenizer = lorakit_greedy(source)
    with closing(llama(gguf_path, lora)) as model:
        for prompt, ids, want, want_logits, size in zip(PROMPTS, prompt_ids, expected, expected_logits, sizes):
            assert model.tokenize(prompt.encode(), add_bos=True, special=False) == ids  # the GGUF's tokenizer
            got, logits = llamacpp_greedy(model, ids)
            assert got == want, prompt
            torch.testing.assert_close(torch.from_numpy(logits), want_logits,
                                       **tol(torch.float32, reduction=reduction, scale=size))
            text = model.detokenize(got).decode("utf-8", errors="replace")
            assert text == tokenizer.decode(got, skip_special_tokens=True)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """(adapter folder, merged f32 GGUF) on the embedded model."""
    root = tmp_path_factory.mktemp("embedded")
    adapter = embedded_adapter(root / "tuned")
    return adapter, export_gguf(adapter, root / "tuned-f32.gguf", log=quiet)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, adapter folder) of the tiny Llama."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama_folder(root / "model")
    return model, tiny_llama_adapter(model, root / "adapter")


def test_embedded_merged_f32_matches_lorakit(embedded):
    adapter, path = embedded
    check_same_tokens(path, adapter)


def test_tiny_llama_merged_f32_matches_lorakit(tiny, tmp_path):
    _, adapter = tiny
    check_same_tokens(export_gguf(adapter, tmp_path / "tiny.gguf", log=quiet), adapter, reduction=128)


def test_tiny_llama_plain_model_matches(tiny, tmp_path):
    model_folder, _ = tiny
    check_same_tokens(export_gguf(model_folder, tmp_path / "base.gguf", log=quiet), model_folder, reduction=128)


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm"])
def test_other_pre_tokenizers_and_scaled_rope_match(tmp_path, pre):
    """Llama 3's and SmolLM's pre-tokenizers (the prompts have digits), and scaled rotary frequencies
    (rope_freqs): linear scaling by 4 divides every frequency, so llama.cpp ignoring rope_freqs changes tokens."""
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    folder = tiny_llama_folder(tmp_path / "model", seed=1, tokenizer=styled_tokenizer(pre), rope_parameters=rope)
    adapter = tiny_llama_adapter(folder, tmp_path / "adapter", seed=1)
    path = export_gguf(adapter, tmp_path / f"{pre}.gguf", log=quiet)
    check_same_tokens(path, adapter, reduction=128)


def test_adapter_only_on_the_base_gguf_matches_lorakit(embedded, tmp_path):
    adapter, _ = embedded
    base = export_gguf("embedded", tmp_path / "base-f32.gguf", log=quiet)
    lora = export_lora_gguf(adapter, tmp_path / "lora-f32.gguf", log=quiet)
    check_same_tokens(base, adapter, lora=lora)


@pytest.mark.parametrize("quant,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_embedded_half_precision_within_its_rounding(embedded, tmp_path, quant, dtype):
    """Half-precision weights move each logit by their rounding: llama.cpp's CPU kernels round weights (and
    activations) once and accumulate in fp32, so the bound is one rounding (tests/_tol.py: K = 1). llama.cpp's
    greedy tokens equal lorakit's until the first step where lorakit's top two are closer than twice the bound."""
    adapter, _ = embedded
    path = export_gguf(adapter, tmp_path / f"tuned-{quant}.gguf", quant=quant, log=quiet)
    prompt_ids, expected, expected_logits, sizes, _ = lorakit_greedy(adapter)
    with closing(llama(path)) as model:
        for ids, want, want_logits, size in zip(prompt_ids, expected, expected_logits, sizes):
            bound = tol(dtype, scale=size)
            model.reset()
            model.eval(ids + want)  # teacher-forced on lorakit's tokens: every step on the same prefix
            steps = np.array(model.scores[len(ids) - 1:len(ids) + len(want) - 1], dtype=np.float32)
            torch.testing.assert_close(torch.from_numpy(steps), want_logits, **bound)
            top2 = want_logits.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 2 * (bound["atol"] + bound["rtol"] * top2[:, 0].abs())
            sure = int(clear.int().argmin()) if not bool(clear.all()) else len(want)  # steps before the first tie
            assert llamacpp_greedy(model, ids)[0][:sure] == want[:sure]


def test_q8_0_loads_and_runs(embedded, tmp_path):
    adapter, _ = embedded
    path = export_gguf(adapter, tmp_path / "tuned-q8_0.gguf", quant="q8_0", log=quiet)
    with closing(llama(path)) as model:
        ids = model.tokenize(PROMPTS[0].encode(), add_bos=True, special=False)
        tokens, logits = llamacpp_greedy(model, ids, steps=8)
    assert len(tokens) == 8 and all(0 <= t < 2048 for t in tokens) and np.isfinite(logits).all()
