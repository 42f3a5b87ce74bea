"""Sources: local json/jsonl/csv/parquet files and folders, lists, limit, shuffle, validation."""
from __future__ import annotations

import json

import pytest

from lorakit.data import DataConfig, load_rows
from lorakit.errors import ConfigError, DataError

ROWS = [{"act": f"Act {i}", "prompt": f"I want you to act as number {i}."} for i in range(12)]


def write(path, rows=ROWS):
    """Write rows in the file format named by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


def cfg(tmp_path, **kwargs):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kwargs)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_load_in_order(tmp_path, suffix):
    path = write(tmp_path / f"prompts{suffix}")
    train, val = load_rows(cfg(tmp_path, source=str(path)))
    assert train == ROWS and val == []


def test_folder_of_files_loads_through_datasets(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.jsonl", ROWS[:8])
    write(folder / "test.jsonl", ROWS[8:])
    train, val = load_rows(cfg(tmp_path, source=str(folder), val_split="test"))
    assert train == ROWS[:8] and val == ROWS[8:]


def test_limit_takes_the_first_rows(tmp_path):
    path = write(tmp_path / "p.jsonl")
    train, _ = load_rows(cfg(tmp_path, source=str(path), limit=5))
    assert train == ROWS[:5]


def test_shuffle_is_seeded_and_limit_applies_after_it():
    first, _ = load_rows(DataConfig(shuffle=True, seed=1, limit=6), rows=ROWS)
    again, _ = load_rows(DataConfig(shuffle=True, seed=1, limit=6), rows=ROWS)
    other, _ = load_rows(DataConfig(shuffle=True, seed=2, limit=6), rows=ROWS)
    assert first == again and first != other
    assert first != ROWS[:6] and all(row in ROWS for row in first) and len(first) == 6


def test_val_fraction_holds_out_a_seeded_disjoint_share():
    train, val = load_rows(DataConfig(val_fraction=0.25, seed=3), rows=ROWS)
    assert len(val) == 3 and len(train) == 9
    assert sorted(map(str, train + val)) == sorted(map(str, ROWS))
    assert [row for row in ROWS if row in train] == train  # training rows keep their order
    assert load_rows(DataConfig(val_fraction=0.25, seed=3), rows=ROWS) == (train, val)
    assert load_rows(DataConfig(val_fraction=0.25, seed=4), rows=ROWS)[1] != val
    _, small = load_rows(DataConfig(val_fraction=0.01), rows=ROWS)
    assert len(small) == 1  # at least one row


def test_val_source_file_and_val_limit(tmp_path):
    val_path = write(tmp_path / "val.csv", ROWS[:4])
    train, val = load_rows(cfg(tmp_path, val_source=str(val_path), val_limit=2), rows=ROWS[4:])
    assert train == ROWS[4:] and val == ROWS[:2]


def test_config_source_may_be_a_list_of_rows():
    assert load_rows(DataConfig(source=ROWS[:3])) == (ROWS[:3], [])


def test_missing_unsupported_and_unset_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="data source './nope.jsonl': no such file or folder"):
        load_rows(DataConfig(source="./nope.jsonl"))
    bad = tmp_path / "rows.txt"
    bad.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_rows(DataConfig(source=str(bad)))
    with pytest.raises(ConfigError, match="data.source is not set"):
        load_rows(DataConfig())
    with pytest.raises(ConfigError, match="val_split needs a source with named splits"):
        load_rows(DataConfig(val_split="test"), rows=ROWS)


def test_unknown_split_of_a_local_file_names_the_file(tmp_path):
    path = write(tmp_path / "p.jsonl")
    with pytest.raises(DataError, match=r"could not load data source '.*p\.jsonl' \(split 'validation'\)"):
        load_rows(cfg(tmp_path, source=str(path), split="validation"))


def test_val_fraction_that_leaves_nothing_is_refused():
    with pytest.raises(DataError, match="leaves no training rows"):
        load_rows(DataConfig(val_fraction=0.5), rows=ROWS[:1])


def test_a_bad_row_is_named_by_its_place_in_the_file_after_shuffle_and_hold_out(tmp_path):
    from _tiny import tiny_tokenizer

    from lorakit.data import tokenize_rows

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(12)]
    rows[7] = {"prompt": "p7", "answer": "c7"}  # the eighth line: row 7, counted from 0
    source = write(tmp_path / "rows.jsonl", rows)
    config = cfg(tmp_path, source=str(source), shuffle=True, seed=3, val_fraction=0.25,
                 format="prompt_completion")
    train, val = load_rows(config)
    assert sorted(train.numbers + val.numbers) == list(range(12))
    bad_split = train if 7 in train.numbers else val
    with pytest.raises(DataError) as error:
        tokenize_rows(bad_split, tiny_tokenizer(), config)
    # datasets fills the column the row lacks with null, so the column list names it too
    assert str(error.value).startswith("row 7: field 'completion' is missing (columns: ")
