"""`lorakit evaluate` on the embedded model: JSON output, adapters, text rows, and batching."""
from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.infer.evaluate import evaluate
from lorakit.infer.generate import greedy_generate
from lorakit.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded"), load_tokenizer("embedded")


def test_batched_generation_equals_one_by_one(embedded):
    model, tokenizer = embedded
    prompts = ["The capital of Japan is", "Question: What is the capital of Peru?\nAnswer:",
               "Kenya uses the"]
    together = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    alone = [greedy_generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


def test_evaluate_scores_text_rows_with_loss_only(embedded):
    model, tokenizer = embedded
    result = evaluate(model, tokenizer, [{"text": "The capital of Japan is Tokyo."}])
    assert set(result) == {"n", "loss", "perplexity", "tokens"}
    assert 0 < result["loss"] < 3  # a sentence of the pre-training kind is easy for it


def test_evaluate_command_json(tmp_path, capsys):
    rows = [{"q": "The capital of the Netherlands is", "a": " Amsterdam"},
            {"q": "The capital of Japan is", "a": " Paris"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["evaluate", "--model", "embedded", "--data", str(data), "--prompt-column", "q",
                 "--completion-column", "a", "--max-new-tokens", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2
    assert result["contains"] == 0.5  # Amsterdam yes, Paris no
    assert result["loss"] > 0 and result["perplexity"] > 1


def test_evaluate_command_with_adapter_and_embedded_set(tmp_path, capsys, embedded):
    from lorakit.adapters import LoRA, apply, save_adapter

    adapted = apply(load_model("embedded"), LoRA(r=2, alpha=4, targets="all-linear"))
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path="embedded")
    args = ["evaluate", "--data", "embedded-eval", "--limit", "6", "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--adapter", str(tmp_path / "adapter")]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    # a fresh LoRA adapter starts at B = 0, so it changes nothing, in every group ("kind") either
    assert with_adapter["by"] == plain["by"] == "kind" and with_adapter["format"] == plain["format"]
    for got, expected in [(with_adapter, plain), *zip(with_adapter["groups"].values(), plain["groups"].values())]:
        numbers = ("n", "exact_match", "contains", "loss", "perplexity", "tokens")
        assert {k: got[k] for k in numbers} == pytest.approx({k: expected[k] for k in numbers})


def test_evaluate_command_reports_missing_file(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
