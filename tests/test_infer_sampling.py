"""Sampling functions: fixed inputs, and parity with transformers' logits processors."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from lorakit.errors import ConfigError
from lorakit.infer.generate import TextStream
from lorakit.decoding.sampling import Sampling, next_token, repetition_penalty, top_k_filter, top_p_filter


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # pure: input untouched


def test_filters_match_transformers():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([3, 7, 7, 20])
    hf_rep = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())[0]
    torch.testing.assert_close(repetition_penalty(logits, seen, 1.3), hf_rep)
    hf_k = TopKLogitsWarper(5)(None, logits[None].clone())[0]
    assert torch.equal(torch.isinf(top_k_filter(logits, 5)), torch.isinf(hf_k))
    for p in (0.3, 0.8, 0.95):
        hf_p = TopPLogitsWarper(p)(None, logits[None].clone())[0]
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(hf_p)), p


def test_top_p_keeps_best_token_and_top_k_counts():
    logits = torch.tensor([0.0, 10.0, 1.0, 2.0])
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [False, True, False, False]
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 2


def test_next_token_greedy_and_seeded_sampling():
    logits = torch.tensor([0.0, 1.0, 5.0, 4.9])
    assert next_token(logits, torch.tensor([], dtype=torch.long), Sampling()) == 2
    assert next_token(logits, torch.tensor([2]), Sampling(repetition_penalty=2.0)) == 3
    option = Sampling(temperature=1.0, top_k=2)
    draws = [next_token(logits, torch.tensor([0]), option, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(draws) == {2, 3}
    again = [next_token(logits, torch.tensor([0]), option, torch.Generator().manual_seed(s)) for s in range(20)]
    assert draws == again


def test_bad_sampling_options_are_named():
    with pytest.raises(ConfigError, match=r"^sampling.top_p: must be in \(0, 1\] \(got 1.5\)$"):
        Sampling(top_p=1.5)
    with pytest.raises(ConfigError, match=r"^sampling.temperature: must be >= 0 \(got -1.0\)$"):
        Sampling(temperature=-1)


def test_text_stream_concatenates_to_full_decode():
    from _tiny import tiny_tokenizer
    tokenizer = tiny_tokenizer()
    ids = tokenizer("Hello world. The quick brown fox, é ü", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    assert "".join(stream.push(t) for t in ids) == tokenizer.decode(ids, skip_special_tokens=True)
    cut = TextStream(tokenizer)  # a stream that ends inside a character: flush gives what decode gives
    pieces = [cut.push(t) for t in tokenizer("é", add_special_tokens=False)["input_ids"][:1]] + [cut.flush()]
    assert "".join(pieces) == tokenizer.decode(tokenizer("é", add_special_tokens=False)["input_ids"][:1])
