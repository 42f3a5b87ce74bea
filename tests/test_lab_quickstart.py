"""A shortened quickstart: it beats the base model on held-out questions and fills its run folder."""
from __future__ import annotations

import json

from lorakit.cli import main


def test_short_quickstart_improves_and_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--steps", "60", "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "What is the capital of the Netherlands?" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["tuned"]["accuracy"]["all"] > report["base"]["accuracy"]["all"]
    assert report["base"]["accuracy"]["all"] <= 0.05
    assert report["training"]["steps"] == 60
    assert 0 < report["parameters"]["trainable"] < report["parameters"]["total"]
    assert report["base"]["general_loss"] > 0 and report["tuned"]["general_loss"] > 0
    shown = report["examples"][0]
    assert shown["prompt"] == "Question: What is the capital of the Netherlands?\nAnswer:"
    assert shown["reference"] == " Amsterdam"
    for name in ("report.md", "predictions.jsonl", "config.yaml", "metrics.jsonl",
                 "loss_curve.png", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    markdown = (out / "report.md").read_text()
    assert "| held-out exact match | base | tuned |" in markdown and "loss_curve.png" in markdown
