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
    rows[7] = {"prompt": "p7", "answer": "c7"}  # the eighth line of the file
    source = write(tmp_path / "rows.jsonl", rows)
    config = cfg(tmp_path, source=str(source), shuffle=True, seed=3, val_fraction=0.25,
                 format="prompt_completion")
    train, val = load_rows(config)
    assert sorted(train.numbers + val.numbers) == list(range(12))
    bad_split = train if 7 in train.numbers else val
    with pytest.raises(DataError) as error:
        tokenize_rows(bad_split, tiny_tokenizer(), config)
    assert str(error.value) == f"{source} line 8: field 'completion' is missing (columns: prompt, answer)"


def test_rows_are_named_by_line_in_line_files_and_by_row_elsewhere(tmp_path):
    """The one numbering rule: 'FILE line N' where rows are lines (a CSV header is line 1, blank lines
    count), 'SOURCE row N' for JSON arrays and parquet, 'row N' in memory; all 1-based."""
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('\n{"text": "x"}\n\n{"text": "y"}\n')
    rows, _ = load_rows(cfg(tmp_path, source=str(jsonl)))
    assert [rows.place(k) for k in range(2)] == [f"{jsonl} line 2", f"{jsonl} line 4"]
    table = tmp_path / "b.csv"
    table.write_text('text,note\n"two\nlines",\n\nz,n\n')
    rows, _ = load_rows(cfg(tmp_path, source=str(table)))
    assert rows == [{"text": "two\nlines", "note": None}, {"text": "z", "note": "n"}]  # an empty cell is null
    assert [rows.place(k) for k in range(2)] == [f"{table} line 2", f"{table} line 5"]
    array = write(tmp_path / "c.json", ROWS[:2])
    rows, _ = load_rows(cfg(tmp_path, source=str(array)))
    assert rows.place(1) == f"{array} row 2"
    parquet = write(tmp_path / "d.parquet", ROWS[:2])
    rows, _ = load_rows(cfg(tmp_path, source=str(parquet)))
    assert rows == ROWS[:2] and rows.place(1) == f"{parquet} row 2"
    rows, _ = load_rows(DataConfig(source=ROWS[:2]))
    assert rows.place(1) == "row 2"


def test_folder_rows_are_named_by_their_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train-a.jsonl", ROWS[:2])
    write(folder / "train-b.csv", ROWS[2:4])
    (folder / "README.md").write_text("# about these rows\n")  # not a data file, as for datasets
    rows, _ = load_rows(cfg(tmp_path, source=str(folder)))
    assert rows == ROWS[:4]
    assert [rows.place(k) for k in (1, 2)] == [f"{folder}/train-a.jsonl line 2", f"{folder}/train-b.csv line 2"]
    with pytest.raises(DataError) as error:
        load_rows(cfg(tmp_path, source=str(folder), split="test"))
    assert str(error.value) == f"data source '{folder}' has no split 'test' (its files give: train)"


@pytest.mark.parametrize("text", [
    '[{"text": "x"},\n {"text": "y"}]',  # one array
    '\ufeff[\n  {"text": "x"},\n  {"text": "y"}\n]\n',  # pretty-printed, with a byte order mark
    '{\n  "text": ["x", "y"]\n}\n',  # one object of columns
    '["x", "y"]',  # an array of strings: text rows, as datasets reads them
    '{"text": "x"}\n{"text": "y"}',  # JSON lines in a .json file, the last without a newline
])
def test_json_files_in_every_shape_datasets_reads(tmp_path, text):
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    assert load_rows(cfg(tmp_path, source=str(path)))[0] == [{"text": "x"}, {"text": "y"}]


@pytest.mark.parametrize("text, message", [
    ('[{"text": "x"},\n {"text": "y"},\n]', "line 3: invalid JSON: Expecting value (column 1)"),
    ('[{"text": "x"}\n {"text": "y"}]', "line 2: invalid JSON: Expecting ',' delimiter (column 2)"),
    ('[{"text": "x"}] []', "line 1: invalid JSON: Extra data (column 17)"),
    ('[{"text": "x"}, 3]', "row 2: expected a JSON object, got number"),
    ('{"text": "x"}\n[1]', "line 2: expected a JSON object, got array"),
    ('{\n "text": ["x"], "id": [1, 2]\n}', ": expected JSON lines, a JSON array of objects, or one object of "
                                          "equal-length column lists"),
])
def test_malformed_json_documents_name_line_and_column(tmp_path, text, message):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_rows(cfg(tmp_path, source=str(path)))
    assert str(error.value) == f"{path}{'' if message.startswith(':') else ' '}{message}"


@pytest.mark.parametrize("text, message", [
    ("text,note\nx,y,z\n", "line 2: 3 fields, but the header (line 1) has 2 columns; quote a field that holds a comma"),
    ("text,note\nx\n", "line 2: 1 fields, but the header (line 1) has 2 columns; quote a field that holds a comma"),
    ("text,text\nx,y\n", "line 1: the header names the column 'text' twice"),
    ("text\n", "has no rows"),
])
def test_malformed_csv_names_the_line(tmp_path, text, message):
    path = tmp_path / "rows.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_rows(cfg(tmp_path, source=str(path)))
    assert str(error.value) == f"{path} {message}"


def test_row_size_cap_applies_to_every_kind_of_source(tmp_path):
    big = {"text": "x" * 300}
    with pytest.raises(DataError) as error:
        load_rows(DataConfig(source=[{"text": "y"}, big], max_row_bytes=200))
    assert str(error.value) == ("row 2: the row is 304 bytes, over data.max_row_bytes (200); shorten or remove "
                                "the row, or raise data.max_row_bytes")
    array = write(tmp_path / "rows.json", [{"text": "y"}, big])
    with pytest.raises(DataError, match=rf"^{array} row 2: the row is 312 bytes, over data.max_row_bytes \(200\)"):
        load_rows(cfg(tmp_path, source=str(array), max_row_bytes=200))
    parquet = write(tmp_path / "rows.parquet", [{"text": "y"}, big])
    with pytest.raises(DataError, match=rf"^{parquet} row 2: the row is 304 bytes"):
        load_rows(cfg(tmp_path, source=str(parquet), max_row_bytes=200))
    table = tmp_path / "rows.csv"
    table.write_text("text\ny\n\"" + "x\n" * 150 + "\"\n")  # one record over 151 lines
    with pytest.raises(DataError, match=rf"^{table} line 3: the row is at least 202 bytes, over data.max_row_bytes"):
        load_rows(cfg(tmp_path, source=str(table), max_row_bytes=200))
