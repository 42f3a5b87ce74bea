"""Truncation to max_length: the answer survives, BOS stays, every cut is counted."""
from __future__ import annotations

import pytest
from _tiny import CHATML, tiny_tokenizer

from lorakit.data import DataConfig, preview_example, tokenize_rows
from lorakit.data.tokenize import truncate
from lorakit.errors import DataError

IGNORE = -100
LONG_PROMPT = "I want you to act as a Linux terminal. Reply with the terminal output only. " * 3
ANSWER = " Answer: four."


def encode(text):
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def run(rows, **cfg):
    return tokenize_rows(rows, tiny_tokenizer(), DataConfig(**cfg))


def test_prompt_side_truncation_keeps_bos_and_the_whole_answer():
    answer = encode(ANSWER) + [2]
    [ex], stats = run([{"prompt": LONG_PROMPT, "completion": ANSWER}], max_length=20)
    assert len(ex["input_ids"]) == 20
    assert ex["input_ids"][0] == 1  # BOS kept
    assert ex["input_ids"][-len(answer):] == answer
    assert ex["input_ids"][1:-len(answer)] == encode(LONG_PROMPT)[-(19 - len(answer)):]  # latest context kept
    assert [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE] == answer
    assert (stats.n_truncated, stats.n_answers_cut, stats.n_dropped) == (1, 0, 0)


def test_short_examples_are_untouched_and_not_counted():
    [ex], stats = run([{"prompt": "Hi", "completion": " there"}], max_length=64)
    assert ex["input_ids"] == [1, *encode("Hi"), *encode(" there"), 2]
    assert (stats.n_truncated, stats.n_dropped) == (0, 0)


def test_answer_longer_than_max_length_is_cut_at_its_end_and_counted():
    [ex], stats = run([{"prompt": "Hi", "completion": LONG_PROMPT}], max_length=10)
    assert ex["input_ids"] == [1, *encode(LONG_PROMPT)[:9]]
    assert (stats.n_truncated, stats.n_answers_cut) == (1, 1)


def test_drop_mode_drops_and_counts():
    rows = [{"prompt": LONG_PROMPT, "completion": ANSWER}, {"prompt": "Hi", "completion": ANSWER}]
    examples, stats = run(rows, max_length=20, truncation="drop")
    assert len(examples) == 1 and stats.n_dropped == 1 and stats.n_truncated == 0


def test_end_truncation_that_removes_every_trained_token_is_an_error_naming_the_row():
    rows = [{"prompt": "Hi", "completion": ANSWER}, {"prompt": LONG_PROMPT, "completion": ANSWER}]
    with pytest.raises(DataError) as error:
        run(rows, max_length=20, truncation="end")
    assert str(error.value).startswith("row 2: no trained token left (max_length=20, prompt_completion format, "
                                       "truncation 'end')")
    examples, stats = run(rows, max_length=20, truncation="end", drop_untrained=True)
    assert len(examples) == 1 and stats.n_dropped == 1
    with pytest.raises(DataError, match="none of the 1 rows gave an example"):
        run(rows[1:], max_length=20, truncation="end", drop_untrained=True)


def test_chat_truncation_drops_old_context_and_keeps_the_last_answer():
    tok = tiny_tokenizer(CHATML)
    turns = [{"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": "Hello world."},
             {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "four."}]
    [ex], stats = tokenize_rows([{"messages": turns}], tok, DataConfig(max_length=24))
    assert len(ex["input_ids"]) == 24 and stats.n_truncated == 1
    assert preview_example(ex, tok).endswith("<|im_start|>assistant\n[[four.<|im_end|>]]\n")


def test_truncate_is_a_pure_function_on_ids():
    ids, labels = [1, 10, 11, 12, 13, 20, 21, 2], [IGNORE] * 5 + [20, 21, 2]
    assert truncate(ids, labels, 5, 1, 6, "prompt") == ([1, 12, 13, 20, 21, 2],
                                                         [IGNORE, IGNORE, IGNORE, 20, 21, 2], "truncated")
    assert truncate(ids, labels, 5, 1, 3, "prompt") == ([1, 20, 21], [IGNORE, 20, 21], "answer_cut")
    assert truncate(ids, labels, 5, 1, 4, "end") == (ids[:4], labels[:4], "answer_cut")  # trained tokens cut
    assert truncate(ids, [IGNORE] * 7 + [2], 7, 1, 7, "end") == (ids[:7], [IGNORE] * 7, "answer_cut")  # the EOS
    assert truncate(ids + [30], labels + [IGNORE], 5, 1, 8, "end") == (ids, labels, "truncated")  # context only
    assert truncate(ids, labels, 5, 1, 8, "prompt") == (ids, labels, "fit")
