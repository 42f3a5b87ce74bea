"""`lorakit pretrain` end to end on a tiny model and corpus (through the real CLI entry point)."""
from __future__ import annotations

import json
import math

from lorakit.cli import main
from lorakit.lab.corpus import build_corpus, corpus_sha256
from lorakit.lab.datasets import read_jsonl

TINY = ["--documents", "300", "--vocab-size", "320", "--hidden-size", "32", "--layers", "2",
        "--heads", "2", "--intermediate-size", "64", "--max-length", "64", "--batch-size", "4",
        "--epochs", "1", "--max-steps", "20", "--warmup-steps", "2", "--lr", "0.01", "--progress", "none"]


def test_pretrain_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["pretrain", "--out", str(out), *TINY]) == 0
    assert "pre-trained" in capsys.readouterr().out
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["config"]["documents"] == 300 and recipe["training"]["steps"] == 20
    assert recipe["corpus"]["sha256"] == corpus_sha256(build_corpus(300, 0))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (out / "model" / name).is_file(), name
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "run" / "loss_curve.png").is_file()
    assert recipe["training"]["final_loss"] < math.log(320) - 1.0  # well below the uniform guess
    train = {r["country"] for r in read_jsonl(out / "data" / "sft_train.jsonl")}
    held_out = {r["country"] for r in read_jsonl(out / "data" / "sft_eval.jsonl")}
    assert train and held_out and not train & held_out

    from lorakit.models import load_model, load_tokenizer

    model, tokenizer = load_model(out / "model"), load_tokenizer(out / "model")
    assert model.config.hidden_size == 32 and len(tokenizer) == 320
    assert model.num_parameters() == recipe["parameters"]
