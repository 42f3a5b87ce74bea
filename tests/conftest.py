"""Shared tiny-model builders for the test suite.

Each builder returns a small random fp32 causal LM built from a config (never downloaded), seeded
so that two calls with the same arguments give identical weights, and put in eval mode.
Import them with `from conftest import tiny_llama`; keyword overrides go to the model config.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from train_fixtures import TEST_THREADS
from transformers import (BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

# Every auto setting takes its conservative value (fp32, unpacked, not compiled) for the whole suite, child
# processes included: the tests' numbers do not depend on the machine (lorakit/train/auto.py). The rules
# themselves are tested in test_auto_defaults.py, which lifts this where it needs to.
os.environ["LORAKIT_AUTO"] = "off"
# tokenized-data cache (data/cache.py): one fresh folder per test session, never the user's ~/.cache
os.environ["LORAKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorakit-test-cache-")
# trackio reads its store folder once, at its first import: a test folder, never ~/.cache
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="lorakit-test-trackio-")

VOCAB = 128  # every tiny model shares this vocabulary size


def _build(model_cls, config, seed: int):
    torch.manual_seed(seed)
    return model_cls(config).float().eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama: separate q/k/v/o and gate/up/down nn.Linear projections, untied lm_head."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _build(LlamaForCausalLM, LlamaConfig(**{**cfg, **overrides}), seed)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """GPT-2: transformers' Conv1D layers (weights stored fan_in x fan_out), tied lm_head."""
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _build(GPT2LMHeadModel, GPT2Config(**{**cfg, **overrides}), seed)


def tiny_bloom(seed: int = 0, **overrides) -> BloomForCausalLM:
    """BLOOM: one fused query_key_value nn.Linear per block, tied lm_head."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _build(BloomForCausalLM, BloomConfig(**{**cfg, **overrides}), seed)


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bloom": tiny_bloom}


def tiny_batch(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) inside the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@pytest.fixture
def one_thread():
    """In-process training on TEST_THREADS threads (LORAKIT_TEST_THREADS, default 1: on a busy 2-core
    machine 2 threads mostly wait on each other), as the child processes the tests compare with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)
