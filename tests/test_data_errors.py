"""Bad training data through the real `lorakit train` entry: one `error:` line naming the file and line,
exit code 2, and the model never loaded (the data is read, templated and tokenized first)."""
from __future__ import annotations

import json
import tracemalloc

import pytest
import yaml

from lorakit import cli
from lorakit.data.files import read_lines
from lorakit.errors import DataError

ROWS = [{"prompt": f"Question {i}?", "completion": f" answer {i}"} for i in range(4)]


class ModelLoaded(Exception):
    """Raised by the stand-in model loader: the data passed every check and the model was next."""


@pytest.fixture
def train(tmp_path, monkeypatch, capsys):
    """train(source, *overrides) -> (exit code, stdout, stderr) of `lorakit train` on the embedded model's
    tokenizer; loading the model raises ModelLoaded, so a data error must come before it."""
    def load_model(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr("lorakit.run.load_model", load_model)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "embedded"}, "method": {"name": "lora", "r": 4, "targets": "all-linear"},
        "data": {"max_length": 64}, "train": {"progress": "none"}, "output_dir": str(tmp_path / "runs")}))

    def run(source, *overrides: str) -> tuple[int, str, str]:
        code = cli.main(["train", str(config), f"data.source={source}", *overrides])
        out, err = capsys.readouterr()
        assert not (tmp_path / "runs").exists()  # a run that never started leaves no folder
        return code, out, err

    return run


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_malformed_json_line_names_file_line_and_the_parsers_complaint(train, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"prompt": "a" "completion": "b"}\n')
    assert train(path) == (2, "", f"error: {path} line 2: invalid JSON: Expecting ',' delimiter (column 16)\n")


def test_an_empty_file_has_no_rows(train, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert train(path) == (2, "", f"error: {path} has no rows\n")
    path.write_text("\n  \n")
    assert train(path) == (2, "", f"error: {path} has no rows\n")


def test_a_latin1_file_names_file_line_and_the_fix(train, tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9?", "completion": " oui"}\n')
    assert train(path) == (2, "", f"error: {path} line 2: not UTF-8 text (byte 0xe9 at column 16); "
                                  "save the file as UTF-8\n")
    table = tmp_path / "latin.csv"
    table.write_bytes(b"prompt,completion\nHi,there\ncaf\xe9?,oui\n")
    assert train(table)[2] == f"error: {table} line 3: not UTF-8 text (byte 0xe9 at column 4); save the file as UTF-8\n"


def test_a_row_over_the_size_cap_is_refused_before_tokenizing(train, tmp_path):
    path = tmp_path / "big.jsonl"
    big = {"prompt": "x" * 2000, "completion": " y"}  # twice the cap below
    size = len(json.dumps(big))
    jsonl(path, [ROWS[0], big])
    assert train(path, "data.max_row_bytes=1000") == (
        2, "", f"error: {path} line 2: the row is {size:,} bytes, over data.max_row_bytes (1,000); shorten or "
               "remove the row, or raise data.max_row_bytes\n")
    assert train(path, "data.max_row_bytes=0")[2] == "error: data.max_row_bytes: must be >= 1 (got 0)\n"


def test_a_huge_line_is_never_held_in_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"text": "' + b"x" * (16 << 20) + b'"}\n{"text": "y"}\n')
    tracemalloc.start()
    with path.open("rb") as handle, pytest.raises(DataError, match="line 1: the row is 16,777,228 bytes"):
        list(read_lines(handle, "huge.jsonl", 1000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # the 16 MiB line was skipped in 1 MiB steps, never held whole


def test_a_folder_of_unsupported_files_is_refused_as_the_file_alone_is(train, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("Some notes.\n")
    assert train(folder) == (2, "", f"error: data source '{folder}': unsupported file type notes.txt "
                                    "(use .json, .jsonl, .csv, .parquet)\n")
    assert train(folder / "notes.txt") == (2, "", f"error: data source '{folder / 'notes.txt'}': unsupported file "
                                                  "type '.txt' (use .json, .jsonl, .csv, .parquet)\n")
    jsonl(folder / "rows.jsonl", ROWS)  # supported files beside it do not make it silently skipped
    assert train(folder)[2] == (f"error: data source '{folder}': unsupported file type notes.txt "
                                "(use .json, .jsonl, .csv, .parquet)\n")


@pytest.mark.parametrize("role", ["robot", "usr"])
def test_an_unknown_chat_role_is_an_error_whatever_the_template(train, tmp_path, role):
    """The embedded model's template renders only system, user and assistant: a 'robot' turn would vanish."""
    path = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": role, "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    assert train(path) == (2, "", f"error: {path} line 2: messages[0] has unknown role '{role}' (known: system, "
                                  "user, assistant, and the aliases human, gpt, bot, developer)\n")


def test_sharegpt_conversations_with_bot_turns_are_detected_and_reach_the_model(train, tmp_path):
    path = jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                   {"from": "bot", "value": "Hello"}]}] * 2)
    with pytest.raises(ModelLoaded):
        train(path)


@pytest.mark.parametrize("suffix, place", [(".jsonl", "line 3"), (".csv", "line 4"), (".json", "row 3")])
def test_a_bad_row_is_named_by_its_1_based_line_or_row(train, tmp_path, suffix, place):
    """Line files say the line an editor shows (a CSV's header is line 1); a JSON array counts its rows."""
    rows = [*ROWS[:2], {"prompt": "Question?", "answer": "no"}]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows[:2])
                        + "Question?,\n")
    missing = "(columns: prompt, answer)" if suffix != ".csv" else "(columns: prompt, completion)"
    assert train(path, "data.format=prompt_completion") == (
        2, "", f"error: {path} {place}: field 'completion' is missing {missing}\n")


def test_the_data_is_checked_before_the_model_loads(train, tmp_path):
    """Reading, formats, templates and trained-token counts all run on the tokenizer alone; the pre-flight
    lines are printed, then the model is loaded."""
    path = jsonl(tmp_path / "rows.jsonl", ROWS)
    assert train(path, "data.max_length=2", "data.truncation=end")[2] == (
        f"error: {path} line 1: no trained token left (max_length=2, prompt_completion format, truncation 'end'); "
        "raise data.max_length, use truncation 'prompt', or set data.drop_untrained\n")
    with pytest.raises(ModelLoaded):
        train(path)


def test_truncation_that_changes_what_is_learned_is_a_warning(train, tmp_path, capsys):
    long = "Describe the history of every river in the world, one by one, with dates. " * 4
    rows = [{"prompt": long, "completion": " Short."}] * 3 + [{"prompt": "Hi", "completion": " " + long}]
    path = jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(ModelLoaded):
        train(path, "data.max_length=32")
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("data: tokenized")]
    fix = "raise data.max_length, or set data.truncation: drop to leave long rows out"
    assert out[2].startswith("data: 4 examples from 4 rows: 4 truncated (1 with the answer cut)")
    assert out[3:] == [
        f"warning: 4 of 4 training rows were truncated to data.max_length=32 tokens; {fix}",
        f"warning: 1 of 4 training rows had their answer cut at data.max_length=32 tokens (the model learns answers "
        f"that stop short); {fix}"]
    with pytest.raises(ModelLoaded):
        train(jsonl(tmp_path / "short.jsonl", ROWS), "data.max_length=32")
    assert "warning" not in capsys.readouterr().out
