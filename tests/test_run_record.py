"""lorakit_run.json: what a run records for inference, and how a record is read back."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lorakit.data.config import DataConfig
from lorakit.data.prompting import RECORD_NAME, PromptFormat, RunRecord, read_record, special_tokens
from lorakit.errors import DataError
from lorakit.models import fingerprint, load_tokenizer, portable_name


def _weights(folder, value: float):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    save_file({"a": torch.full((64, 64), value), "b": torch.arange(4096.0)}, str(folder / "model.safetensors"))
    return folder


def test_fingerprint_tells_weights_apart_and_reads_only_headers_and_samples(tmp_path):
    first, same, other = (_weights(tmp_path / name, v) for name, v in (("m1", 1.0), ("m2", 1.0), ("m3", 2.0)))
    assert fingerprint(first) == fingerprint(same)
    assert fingerprint(first)["sha256"] != fingerprint(other)["sha256"]
    assert fingerprint(tmp_path / "missing-hub/id") is None  # not local: no fingerprint, no error
    assert fingerprint("embedded")["files"] == 1


def test_portable_name_resolves_from_another_directory(tmp_path, monkeypatch):
    _weights(tmp_path / "base", 1.0)
    monkeypatch.chdir(tmp_path)
    name = portable_name("base")
    assert os.path.isabs(name) and name == str((tmp_path / "base").resolve())
    assert portable_name("embedded") == "embedded" and portable_name("org/model") == "org/model"


def test_a_record_round_trips_and_a_bad_one_is_one_clear_error(tmp_path):
    tokenizer = load_tokenizer("embedded")
    prompt = PromptFormat.of_run(DataConfig(format="chat", system_prompt="Be brief."), "chat", tokenizer)
    assert prompt.chat_template == tokenizer.chat_template  # the template's text travels, not a reference
    record = RunRecord(prompt, "embedded", None, fingerprint("embedded"), prompt.end_of_turn(tokenizer),
                       special_tokens(tokenizer))
    record.write(tmp_path)
    assert read_record(tmp_path) == record
    assert read_record(tmp_path / "elsewhere") is None  # folders from before records
    body = json.loads((tmp_path / RECORD_NAME).read_text())
    (tmp_path / RECORD_NAME).write_text(json.dumps({**body, "lorakit_run_record": 99}))
    with pytest.raises(DataError, match="record version 99; this lorakit reads version 1"):
        read_record(tmp_path)
    (tmp_path / RECORD_NAME).write_text("{not json")
    with pytest.raises(DataError, match="is not a readable lorakit run record"):
        read_record(tmp_path)
