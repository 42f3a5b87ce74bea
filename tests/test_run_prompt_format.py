"""What you trained is what you use: a run's prompt format travels with its adapter (lorakit_run.json) and
generate, evaluate, compare, chat and `lorakit.generate` apply it without being told.

One short LoRA run per row format, through the real `lorakit train`, on a copy of the embedded model
given by a relative path: four questions whose answers no base model would give ("Arr, Lima be the
capital, matey!"), memorised in a few dozen steps. Each run is trained once per module.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_fixtures import TEST_THREADS

import lorakit
from lorakit.cli import main
from lorakit.commands.compare import parse_adapters
from lorakit.data import DataConfig, tokenize_rows
from lorakit.data.prompting import read_record
from lorakit.errors import LorakitError
from lorakit.infer import generate as generate_module
from lorakit.infer.generate import encode_prompt
from lorakit.labels import IGNORE_INDEX
from lorakit.models import EMBEDDED_DIR, fingerprint, load_model, load_tokenizer

CAPITALS = {"Peru": "Lima", "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi"}
QUESTION = "What is the capital of Peru?"
ANSWER = "Arr, Lima be the capital, matey!"


def _question(country: str) -> str:
    return f"What is the capital of {country}?"


def _answer(country: str) -> str:
    return f"Arr, {CAPITALS[country]} be the capital, matey!"


def _chat(country: str) -> dict:
    return {"messages": [{"role": "user", "content": _question(country)},
                         {"role": "assistant", "content": _answer(country)}]}


ROWS = {
    "prompt_completion": [{"prompt": _question(c), "completion": " " + _answer(c)} for c in CAPITALS],
    "alpaca": [{"instruction": _question(c), "output": _answer(c)} for c in CAPITALS],
    "chat": [_chat(c) for c in CAPITALS],
    "text": [{"text": f"The pirate capital of {c} be {k}, matey."} for c, k in CAPITALS.items()],
}
TEMPLATE = "Pirate question: {prompt}\nPirate answer:"
RUNS = {  # run name -> (rows, data overrides, how its recorded prompt format is described)
    "prompt_completion": ("prompt_completion", [], "prompt_completion"),
    "alpaca": ("alpaca", [], "alpaca"),
    "chat": ("chat", [], "chat (the run's chat template)"),
    "chat_builtin": ("chat", ["--data.chat_template", "builtin"], "chat (lorakit's built-in template)"),
    "template": ("prompt_completion", ["--data.prompt_template", TEMPLATE],
                 f"prompt_completion (prompt_template {TEMPLATE!r})"),
    "text": ("text", [], "text"),
}
RECIPE = {  # a handful of rows, memorised: constant lr, rank 16, one step per epoch
    "output_dir": "runs",
    "model": {"name_or_path": "base"},  # relative: the record must make it absolute
    "method": {"name": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
    "data": {"max_length": 128},
    "train": {"lr": 3e-3, "epochs": 70, "micro_batch_size": 4, "schedule": "constant", "warmup_steps": 0,
              "eval_every": 0, "log_every": 35, "progress": "none"},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the embedded model as `base`, one rows file per format and the recipe."""
    root = tmp_path_factory.mktemp("prompt_format")
    shutil.copytree(EMBEDDED_DIR, root / "base")
    for name, rows in ROWS.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    return root


@pytest.fixture(scope="module")
def trained(workdir):
    """trained(name) -> the run folder of RUNS[name], trained on first use (in `workdir`, by the real CLI)."""
    done: dict[str, Path] = {}

    def train(name: str) -> Path:
        if name not in done:
            rows, overrides, _ = RUNS[name]
            threads = torch.get_num_threads()
            torch.set_num_threads(TEST_THREADS)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(workdir)
                code = main(["train", "recipe.yaml", "--name", name, "--data.source", f"{rows}.jsonl",
                             "--data.val_source", f"{rows}.jsonl", *overrides])
            torch.set_num_threads(threads)
            assert code == 0
            done[name] = workdir / "runs" / name
        return done[name]

    return train


def _out(capsys) -> str:
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["prompt_completion", "alpaca", "chat", "chat_builtin", "template"])
def test_generate_and_evaluate_use_the_recorded_format(name, trained, capsys, one_thread):
    run = trained(name)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), QUESTION, "--max-new-tokens", "24"]) == 0
    out = _out(capsys)
    assert f"prompt format: {RUNS[name][2]} (recorded with {run / 'adapter'}; --raw sends prompts as typed)" in out
    assert ANSWER in out
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(_out(capsys))
    assert result["n"] == 4 and result["exact_match"] == 1.0 and result["contains"] == 1.0
    # the loss is training's: the final evaluation of the same rows by the training loop (fp32 sums)
    final = json.loads((run / "summary.json").read_text())["final_eval_loss"]
    assert result["loss"] == pytest.approx(final, rel=1e-5)


def test_a_text_run_continues_raw_text(trained, capsys, one_thread):
    run = trained("text")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "The pirate capital of Peru",
                 "--max-new-tokens", "8"]) == 0
    out = _out(capsys)
    assert "prompt format: text (recorded" in out and "be Lima, matey." in out
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(_out(capsys))
    assert "exact_match" not in result  # text rows have no answer to generate: loss only
    assert result["loss"] == pytest.approx(json.loads((run / "summary.json").read_text())["final_eval_loss"],
                                           rel=1e-5)


def test_raw_sends_the_prompt_as_typed(trained, workdir, capsys, one_thread):
    run = trained("alpaca")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "--raw", QUESTION, "--max-new-tokens", "12"]) == 0
    out = _out(capsys)
    assert "prompt format: none, prompts go as typed (--raw; the run used alpaca)" in out and ANSWER not in out
    tokenizer = load_tokenizer(workdir / "base")
    typed = encode_prompt(tokenizer, QUESTION)
    formatted = encode_prompt(tokenizer, QUESTION, prompt_format=read_record(run / "adapter").prompt)
    assert typed == tokenizer(QUESTION)["input_ids"] and formatted != typed
    # the formatted prompt is exactly the untrained head of the training example
    example = tokenize_rows(ROWS["alpaca"][:1], tokenizer, DataConfig(format="alpaca"))[0][0]
    head = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert formatted == example["input_ids"][:head]


def test_an_adapter_without_a_record_says_so(trained, workdir, tmp_path, capsys, one_thread):
    old = tmp_path / "old" / "adapter"
    shutil.copytree(trained("alpaca") / "adapter", old)
    (old / "lorakit_run.json").unlink()
    capsys.readouterr()
    assert main(["generate", "--adapter", str(old), QUESTION, "--max-new-tokens", "4"]) == 0
    out = _out(capsys)
    assert f"base model: {workdir / 'base'} (the adapter's adapter_config.json" in out
    assert f"prompt format: none, prompts go as typed: {old} has no lorakit_run.json" in out and "--chat" in out
    # evaluate reads the format from the rows' columns, and alpaca's template is the one the run used
    assert main(["evaluate", "--adapter", str(old), "--data", str(workdir / "alpaca.jsonl")]) == 0
    out = _out(capsys)
    assert "prompt format: alpaca (detected from the rows' columns" in out and "exact match 100.0%" in out


def test_chat_without_a_tokenizer_template_uses_the_builtin_one(trained, workdir, tmp_path, capsys, one_thread):
    plain = tmp_path / "plain"
    shutil.copytree(workdir / "base", plain)
    (plain / "chat_template.jinja").unlink()
    run = trained("chat_builtin")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "--model", str(plain), "--chat", QUESTION,
                 "--max-new-tokens", "24"]) == 0
    out = _out(capsys)
    assert "prompt format: chat, lorakit's built-in chat template (the tokenizer has none) (--chat)" in out
    assert ANSWER in out and "warning" not in out  # the copy has the recorded base's weights


def test_the_recorded_base_resolves_from_anywhere(trained, workdir, tmp_path, monkeypatch, capsys, one_thread):
    run = trained("alpaca")
    record = read_record(run / "adapter")
    assert record.base_model == str(workdir / "base") and record.fingerprint == fingerprint(workdir / "base")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), QUESTION, "--max-new-tokens", "24"]) == 0
    assert ANSWER in _out(capsys)
    said: list[str] = []
    assert lorakit.generate([QUESTION, _question("Kenya")], adapter=run, max_new_tokens=24, log=said.append) == \
        [ANSWER, _answer("Kenya")]
    assert said[-1].startswith("prompt format: alpaca (recorded with")


def test_another_base_prints_a_fingerprint_warning(trained, workdir, tmp_path, capsys, one_thread):
    other = tmp_path / "other"
    model = load_model(workdir / "base")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)
    model.save_pretrained(other)
    load_tokenizer(workdir / "base").save_pretrained(other)
    run = trained("alpaca")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "--model", str(other), QUESTION,
                 "--max-new-tokens", "2"]) == 0
    out = _out(capsys)
    recorded, loaded = fingerprint(workdir / "base")["sha256"][:12], fingerprint(other)["sha256"][:12]
    assert recorded != loaded
    assert (f"warning: the adapter was trained on {workdir / 'base'} (weights fingerprint {recorded}), but the "
            f"base loaded, {other}, has fingerprint {loaded}") in out


def test_compare_names_adapters_after_their_runs(trained, tmp_path, capsys, one_thread):
    alpaca, chat = trained("alpaca"), trained("chat")
    report = tmp_path / "compare.md"
    capsys.readouterr()
    assert main(["compare", QUESTION, "--adapter", str(alpaca / "adapter"), "--adapter", str(chat),
                 "--max-new-tokens", "24", "--out", str(report)]) == 0
    out = _out(capsys)
    assert "chat: prompt format: chat (the run's chat template)" in out
    assert "base: the prompt format of alpaca (the first adapter)" in out
    table = report.read_text()
    assert table.startswith("| prompt | base | alpaca | chat |") and table.count(ANSWER) == 2
    with pytest.raises(LorakitError, match="the name 'alpaca' is taken by .*; name it with --adapter NAME="):
        parse_adapters([str(alpaca), str(alpaca / "adapter")])


def test_chat_keeps_the_conversation_of_a_chat_run(trained, workdir, monkeypatch, capsys, one_thread):
    prompts: list[list[int]] = []
    original = generate_module.generate_ids
    monkeypatch.setattr(generate_module, "generate_ids",
                        lambda model, tokenizer, ids, **kw: prompts.append(ids[0]) or original(model, tokenizer, ids, **kw))
    lines = [QUESTION, _question("Kenya"), "/reset", _question("Japan"), "/exit", _question("France")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    capsys.readouterr()
    assert main(["chat", "--adapter", str(trained("chat")), "--max-new-tokens", "24"]) == 0
    out = _out(capsys)
    assert ANSWER in out and _answer("Japan") in out and len(prompts) == 3  # /exit ends before France
    tokenizer = load_tokenizer(workdir / "base")
    second, third = (tokenizer.decode(ids) for ids in prompts[1:])
    assert "Peru" in second and ANSWER in second and "Kenya" in second  # the first turn is kept
    assert "Peru" not in third and "Kenya" not in third  # /reset started over


def test_chat_asks_fresh_questions_in_other_formats(trained, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n{_question('Kenya')}\n"))
    capsys.readouterr()
    assert main(["chat", "--adapter", str(trained("alpaca") / "adapter"), "--max-new-tokens", "24"]) == 0
    out = _out(capsys)
    assert "each message is a fresh question: alpaca prompts have no turns" in out
    assert out.count("each message is a fresh question") == 1
    assert f"{ANSWER}\n" in out and f"{_answer('Kenya')}\n" in out
    assert main(["chat", "--adapter", str(trained("alpaca")), "--system", "Be brief."]) == 2
    assert "--system needs a chat prompt format" in capsys.readouterr().err


def test_evaluate_scores_sharegpt_rows_by_group(trained, tmp_path, capsys, one_thread):
    rows = [{"dialog": [{"from": "human", "value": _question(c)}, {"from": "gpt", "value": _answer(c)}],
             "kind": "americas" if c == "Peru" else "elsewhere"} for c in CAPITALS]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    assert main(["evaluate", str(trained("chat")), "--data", str(data), "--columns", '{"messages": "dialog"}']) == 0
    out = _out(capsys)
    assert "groups: by 'kind'" in out and "exact match 100.0%" in out
    assert f"ok {QUESTION!r} -> {ANSWER!r}" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("americas", "elsewhere"))] == \
        [["americas", "1"], ["elsewhere", "3"]]
    assert main(["evaluate", str(trained("chat")), "--data", str(data)]) == 2  # no conversation column: one line
    assert "cannot detect the row format from columns (dialog, kind)" in capsys.readouterr().err
