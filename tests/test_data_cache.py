"""The tokenization cache: a hit is tokenize_rows bit for bit; anything tokenization reads changes the key."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny import CHATML, tiny_tokenizer

from lorakit.data import DataConfig, tokenize_rows
from lorakit.data import cache
from lorakit.data.cache import cache_key, cached_tokenize, tokenize_with_cache
from lorakit.data.formats import FORMATS, RowFormat, register_format, render_text
from lorakit.errors import ConfigError, DataError

ROWS = [{"prompt": "Question: what is two plus two?", "completion": " Answer: four."},
        {"prompt": "Hello world.", "completion": " The quick brown fox jumps over the lazy dog."},
        {"prompt": "I want you to act as a Linux terminal. " * 4, "completion": " Reply with the output only."}]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world."},
                       {"role": "assistant", "content": "The quick brown fox."}, {"role": "user", "content": "Two?"},
                       {"role": "assistant", "content": "Four."}]}]
OTHER_TEMPLATE = CHATML.replace("<|im_end|>\\n", "<|im_end|>\\n\\n")


@pytest.fixture(autouse=True)
def cache_on(monkeypatch):
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.delenv("LORAKIT_CACHE_DIR", raising=False)


def call(rows, tmp_path, tokenizer=None, **cfg):
    """tokenize_with_cache with the log lines it printed."""
    lines = []
    result = tokenize_with_cache(rows, tokenizer or tiny_tokenizer(CHATML), DataConfig(**cfg), tmp_path,
                                 log=lines.append)
    return result, lines


def key(rows=ROWS, tokenizer=None, **cfg):
    return cache_key(rows, tokenizer or tiny_tokenizer(CHATML), DataConfig(**cfg))


@pytest.mark.parametrize("rows, cfg", [(ROWS, {"max_length": 16}), (CHATS, {}), (ROWS, {"train_on_prompt": True})])
def test_a_hit_returns_exactly_what_tokenize_rows_returns(tmp_path, rows, cfg):
    expected = tokenize_rows(rows, tiny_tokenizer(CHATML), DataConfig(**cfg))
    first, first_lines = call(rows, tmp_path, **cfg)
    second, second_lines = call(rows, tmp_path, **cfg)
    assert not first.hit and second.hit and first.key == second.key
    assert (first.examples, first.stats) == expected
    assert (second.examples, second.stats) == expected
    assert all(type(token) is int for ex in second.examples for seq in ex.values() for token in seq)
    assert first_lines == [f"data: tokenized {len(rows)} rows in {first.tokenize_seconds:.1f} s (cached as key "
                           f"{first.key[:12]} in {tmp_path})"]
    assert second_lines == [f"data: tokenized rows from the cache (key {first.key[:12]}; LORAKIT_CACHE=off to "
                            "recompute)"]
    assert second.tokenize_seconds == first.tokenize_seconds > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{first.key}.npz"]  # no temporary file left


def test_cached_tokenize_is_the_pair_and_prints_its_line(tmp_path, capsys):
    assert cached_tokenize(ROWS, tiny_tokenizer(CHATML), DataConfig(), tmp_path) == \
        tokenize_rows(ROWS, tiny_tokenizer(CHATML), DataConfig())
    assert capsys.readouterr().out.startswith(f"data: tokenized {len(ROWS)} rows in ")


def test_the_file_holds_arrays_not_pickles_and_stores_full_labels_when_they_are_not_the_ids(tmp_path):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 9]}, {"input_ids": [2**40], "labels": [2**40]}]
    stats = dataclasses.replace(tokenize_rows(ROWS, tiny_tokenizer(CHATML), DataConfig())[1], n_examples=2)
    path = tmp_path / "k.npz"
    cache.write_examples(path, "k", examples, stats, 1.5)
    with np.load(path, allow_pickle=False) as archive:
        assert {"input_ids", "offsets", "labels", "meta"} == set(archive.files)
        assert archive["input_ids"].dtype == np.int64  # 2**40 does not fit int32
    assert cache.read_examples(path, "k") == (examples, stats, 1.5)
    with pytest.raises(ValueError, match="holds key k"):
        cache.read_examples(path, "another")


def test_a_change_in_the_data_is_a_miss():
    changed = [dict(ROWS[0], completion=" Answer: five."), *ROWS[1:]]
    keys = {key(), key(changed), key(ROWS[:2]), key(ROWS[::-1]), key([*ROWS, ROWS[0]])}
    assert len(keys) == 5
    typed = [{"text": "1", "n": 1}, {"text": "1", "n": 1.0}, {"text": "1", "n": "1"}, {"text": "1", "n": True}]
    assert len({key([row]) for row in typed}) == len(typed)  # values of different types never collide


def test_a_change_in_the_tokenizer_is_a_miss():
    assert key(CHATS, tiny_tokenizer(CHATML)) != key(CHATS, tiny_tokenizer(OTHER_TEMPLATE))
    assert key(tokenizer=tiny_tokenizer(CHATML)) != key(tokenizer=tiny_tokenizer(CHATML, add_bos=False))
    assert key(tokenizer=tiny_tokenizer(CHATML)) != key(tokenizer=tiny_tokenizer(None))


def test_a_tokenizer_with_another_eos_is_a_miss():
    from lorakit.data import train_byte_bpe
    from _tiny import CORPUS

    def build(eos):
        return train_byte_bpe(CORPUS, vocab_size=320, eos_token=eos, extra_special_tokens=("<|im_start|>",
                                                                                          "<|im_end|>"))
    assert key(tokenizer=build("</s>")) == key(tokenizer=build("</s>"))  # a rebuilt tokenizer: the same key
    assert key(tokenizer=build("</s>")) != key(tokenizer=build("<|im_end|>"))


CHANGES = {"format": "prompt_completion", "columns": {"prompt": "completion", "completion": "prompt"},
           "prompt_template": "{prompt}\n", "system_prompt": "Be kind.", "chat_template": "builtin",
           "max_length": 17, "truncation": "end", "drop_untrained": True, "train_on_prompt": True,
           "skip_bad_rows": True, "add_eos": False}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_each_field_tokenization_reads_changes_the_key(field):
    assert key(**{field: CHANGES[field]}) != key()


IGNORED = {"source": "other.jsonl", "subset": "x", "split": "test", "limit": 2, "shuffle": True, "seed": 3,
           "val_source": "val.jsonl", "val_split": "test", "val_fraction": 0.5, "val_limit": 1,
           "max_row_bytes": 10_000, "packing": True, "cache_dir": "/tmp/hf"}


def test_fields_that_only_choose_rows_or_act_later_do_not_change_the_key():
    changed = {"val_source": None, "val_split": None} | {k: v for k, v in IGNORED.items() if "val_" not in k}
    assert key(**changed) == key()
    assert key(val_split="test", val_limit=1) == key() == key(val_fraction=0.5)


def test_every_data_field_is_in_the_key_or_said_not_to_be():
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    assert set(cache.NOT_IN_KEY) <= fields
    assert set(cache.key_fields(DataConfig())) == fields - set(cache.NOT_IN_KEY) == set(CHANGES)


def test_a_change_in_the_tokenization_code_or_the_formats_is_a_miss(monkeypatch):
    before = key()
    register_format(RowFormat("cache_test_format", ("cache_test_column",), render_text))
    try:
        assert key() != before
    finally:
        del FORMATS["cache_test_format"]
    assert key() == before
    source = cache._source_bytes
    monkeypatch.setattr(cache, "_source_bytes",
                        lambda name: source(name) + (b"# edited" if name == "lorakit.data.tokenize" else b""))
    assert key() != before


def test_the_key_is_the_same_in_another_process():
    script = ("import sys; sys.path.insert(0, 'tests'); from _tiny import CHATML, tiny_tokenizer; "
              "from lorakit.data import DataConfig; from lorakit.data.cache import cache_key; "
              f"print(cache_key({ROWS!r}, tiny_tokenizer(CHATML), DataConfig(max_length=16)))")
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == key(max_length=16)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "empty"])
def test_a_corrupt_file_is_a_miss_with_a_note_and_is_replaced(tmp_path, damage):
    first, _ = call(ROWS, tmp_path)
    data = first.path.read_bytes()
    damaged = {"garbage": b"not a zip file", "truncated": data[: len(data) // 2], "empty": b"",
               "flipped": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]}[damage]
    first.path.write_bytes(damaged)
    again, lines = call(ROWS, tmp_path)
    assert not again.hit and (again.examples, again.stats) == (first.examples, first.stats)
    assert lines[0].startswith(f"data: note: the tokenization cache file {first.path} is unreadable (")
    assert lines[0].endswith("tokenizing again and replacing it") and lines[1].startswith("data: tokenized 3 rows")
    assert call(ROWS, tmp_path)[0].hit


def test_a_file_of_another_key_is_not_trusted(tmp_path):
    first, _ = call(ROWS, tmp_path)
    other, _ = call(ROWS[:1], tmp_path)
    other.path.replace(first.path)  # a file under the wrong name
    again, lines = call(ROWS, tmp_path)
    assert not again.hit and f"holds key {other.key[:12]}" in lines[0]
    assert again.examples == first.examples


def test_lorakit_cache_off_tokenizes_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", "off")
    result, lines = call(ROWS, tmp_path)
    assert not result.hit and result.key is None and list(tmp_path.iterdir()) == []
    assert lines == [f"data: tokenized 3 rows in {result.tokenize_seconds:.1f} s (cache off: LORAKIT_CACHE=off)"]
    monkeypatch.setenv("LORAKIT_CACHE", "sometimes")
    with pytest.raises(ConfigError, match="LORAKIT_CACHE='sometimes': use 'off'"):
        call(ROWS, tmp_path)


def test_the_default_folder_follows_lorakit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "lk"))
    assert cache.default_cache_dir() == tmp_path / "lk" / "tokenized"
    result = tokenize_with_cache(ROWS, tiny_tokenizer(CHATML), DataConfig(), log=lambda line: None)
    assert result.path == tmp_path / "lk" / "tokenized" / f"{result.key}.npz" and result.path.is_file()
    monkeypatch.delenv("LORAKIT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "lorakit" / "tokenized"


def test_a_failed_write_leaves_no_file_and_says_so(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", fail)
    result, lines = call(ROWS, tmp_path)
    assert result.examples == tokenize_rows(ROWS, tiny_tokenizer(CHATML), DataConfig())[0]
    assert list(tmp_path.iterdir()) == []
    assert "could not write the tokenization cache" in lines[0] and "No space left on device" in lines[0]
    assert lines[1].endswith("(not cached)")


def test_rows_that_cannot_be_hashed_are_tokenized_without_the_cache(tmp_path):
    rows = [{"text": "Hello world.", "extra": {1, 2}}]
    result, lines = call(rows, tmp_path, format="text")
    assert result.key is None and list(tmp_path.iterdir()) == []
    assert lines[0] == "data: note: tokenizing without the cache: row 1 holds a value json cannot write (set)"
    assert result.examples == tokenize_rows(rows, tiny_tokenizer(CHATML), DataConfig(format="text"))[0]


def test_bad_rows_raise_as_before_and_nothing_is_cached(tmp_path):
    with pytest.raises(DataError, match="row 2: field 'completion' is missing"):
        call([ROWS[0], {"prompt": "Hi"}], tmp_path, format="prompt_completion")
    assert list(tmp_path.iterdir()) == []


def test_no_rows_is_no_examples_and_no_file(tmp_path):
    result, lines = call([], tmp_path)
    assert (result.examples, result.key, lines, list(tmp_path.iterdir())) == ([], None, [], [])


def test_meta_records_the_stats_and_the_key(tmp_path):
    result, _ = call(ROWS, tmp_path)
    with np.load(result.path, allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
        assert archive["input_ids"].dtype == np.int32 and archive["trained"].dtype == bool
    assert meta["key"] == result.key and meta["stats"] == dataclasses.asdict(result.stats)
