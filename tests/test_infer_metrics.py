"""Scoring math on fixed inputs, and the token loss against a hand-computed cross-entropy."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from _tol import approx
from lorakit.errors import DataError
from lorakit.infer.evaluate import evaluate, read_rows
from lorakit.infer.metrics import accuracy, contains, exact_match, normalize, scored_ids, token_loss


def test_normalize_and_matches():
    assert normalize("  Amsterdam \n") == "amsterdam"
    assert normalize("Port  of\tSpain") == "port of spain"
    assert exact_match(" amsterdam", " Amsterdam")
    assert not exact_match(" Amsterdam.", " Amsterdam")
    assert contains(" It is Amsterdam, I think", " amsterdam")
    assert not contains(" Rotterdam", " Amsterdam")


def test_accuracy_fractions():
    predictions = [" Amsterdam", " the capital is Tokyo", " Lima", " Oslo."]
    references = [" Amsterdam", " Tokyo", " Quito", " Oslo"]
    assert accuracy(predictions, references) == {"exact_match": 0.25, "contains": 0.75}
    with pytest.raises(ValueError):
        accuracy(predictions, references[:2])


class CharTokenizer:
    """One token per character; id 0 is EOS/pad. Enough to check the loss bookkeeping."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + (ord(ch) % 30) for ch in text]}


def test_scored_ids_mask_prompt_and_add_eos():
    tokenizer = CharTokenizer()
    ids, labels = scored_ids(tokenizer, "ab", "c")
    assert ids == [1 + 97 % 30, 1 + 98 % 30, 1 + 99 % 30, 0]
    assert labels == [-100, -100, ids[2], 0]
    ids, labels = scored_ids(tokenizer, "", "ab")
    assert labels == [-100, ids[1], 0]


def test_token_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 32))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.inner(input_ids)})

    wrapper = Wrapper()
    tokenizer = CharTokenizer()
    pairs = [("ab", "cd"), ("x", "y")]
    result = token_loss(wrapper, tokenizer, pairs, batch_size=1)
    total, count = 0.0, 0
    for prompt, target in pairs:
        ids, labels = scored_ids(tokenizer, prompt, target)
        logits = model(torch.tensor([ids]))[0]
        for t in range(1, len(ids)):
            if labels[t] != -100:
                total += F.cross_entropy(logits[t - 1], torch.tensor(labels[t])).item()
                count += 1
    assert result["tokens"] == count == 5
    assert result["loss"] == approx(total / count, reduction=32)  # vocabulary 32
    assert result["perplexity"] == approx(math.exp(total / count), reduction=32)
    # batching with padding gives the same loss
    assert token_loss(wrapper, tokenizer, pairs, batch_size=2)["loss"] == approx(result["loss"], reduction=32)


def test_evaluate_rejects_bad_rows():
    with pytest.raises(DataError, match="row 1: field 'completion'"):
        evaluate(None, None, [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match="no rows"):
        evaluate(None, None, [])


def test_read_rows_renames_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"q": "Question: x\nAnswer:", "a": " y"}) + "\n")
    rows = read_rows(path, prompt_column="q", completion_column="a")
    assert rows == [{"prompt": "Question: x\nAnswer:", "completion": " y"}]
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
