"""The recipes in configs/: shipped with the package, valid, and the lecture's classic one runs.

The bloomz recipe needs the hub, so its test keeps every setting of the recipe and swaps only
the model (a tiny BLOOM-architecture model saved to a temporary folder) and the data source (a
local jsonl with the real dataset's `act`/`prompt` columns), through command-line overrides.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from _tol import tol
from train_fixtures import TEST_THREADS
import lorakit
from lorakit.config import RECIPES_DIR, load_config
from lorakit.data import train_byte_bpe

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROLES = ("Linux Terminal", "English Translator", "Interviewer", "JavaScript Console", "Excel Sheet", "Travel Guide",
         "Storyteller", "Football Commentator", "Poet", "Chef", "Doctor", "Math Tutor", "Stand-up Comedian",
         "Motivational Coach", "Movie Critic", "Novelist", "Relationship Coach", "Composer", "Debater", "Historian")


def awesome_prompts_rows() -> list[dict]:
    """60 rows shaped like fka/awesome-chatgpt-prompts: a role (`act`) and the prompt for it."""
    templates = ("I want you to act as a {r}. Reply only as a {r} would.",
                 "I want you to act as a {r}. Do not write explanations.",
                 "I want you to act as a {r}. My first request is to help me.")
    return [{"act": f"{role}", "prompt": t.format(r=role.lower())} for t in templates for role in ROLES]


def test_repo_configs_are_the_shipped_recipes():
    shipped = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))
    assert shipped == sorted(p.name for p in REPO_CONFIGS.glob("*.yaml")) and "bloomz-awesome-prompts.yaml" in shipped
    for name in shipped:
        assert (REPO_CONFIGS / name).read_bytes() == (RECIPES_DIR / name).read_bytes(), name
        load_config(RECIPES_DIR / name)  # every recipe validates


def test_bloomz_recipe_is_the_lecture_recipe():
    cfg = load_config("bloomz-awesome-prompts")
    assert cfg.model.name_or_path == "bigscience/bloomz-560m"
    assert (cfg.data.source, cfg.data.limit) == ("fka/awesome-chatgpt-prompts", 50)
    assert cfg.data.columns == {"prompt": "act", "completion": "prompt"}
    m = cfg.method
    assert (m.name, m.r, m.alpha, m.targets, m.dropout, m.bias) == ("lora", 4, 4, "query_key_value", 0.05, "lora_only")
    assert (cfg.train.lr, cfg.train.epochs) == (3e-2, 2)




@pytest.fixture(scope="module")
def tiny_bloom_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bloomz")
    rows = awesome_prompts_rows()
    tokenizer = train_byte_bpe([f"{r['act']}\n{r['prompt']}" for r in rows], vocab_size=300, add_bos=False)
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    BloomForCausalLM(config).save_pretrained(root / "bloom")
    tokenizer.save_pretrained(root / "bloom")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_bloomz_recipe_runs_offline_on_a_tiny_bloom(tiny_bloom_dir):
    from peft import PeftModel

    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "bloomz-awesome-prompts",
                             "--model.name_or_path", str(tiny_bloom_dir / "bloom"),
                             "--data.source", str(tiny_bloom_dir / "prompts.jsonl")],
                            cwd=tiny_bloom_dir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[[I want you to act as a linux terminal." in result.stdout  # pre-flight: the answer is trained
    assert "50 examples from 50 rows" in result.stdout  # the first 50 rows
    run_dir = tiny_bloom_dir / "runs" / "bloomz-awesome-prompts"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 26  # 2 epochs x 13 batches of 4
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3

    adapter = run_dir / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["bias"]) == (4, 4, 0.05, "lora_only")
    assert saved["target_modules"] in ("query_key_value", ["query_key_value"])
    weights = load_file(adapter / "adapter_model.safetensors")
    base = load_file(tiny_bloom_dir / "bloom" / "model.safetensors")
    bias_key = "base_model.model.transformer.h.0.self_attention.query_key_value.base_layer.bias"
    trained_bias = weights[bias_key]  # lora_only: the adapted layers' biases train and are saved
    assert not torch.equal(trained_bias, base["transformer.h.0.self_attention.query_key_value.bias"])

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir / "bloom"), adapter)
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir / "bloom"), adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                                   **tol(reduction=512))  # vocabulary 300


def test_quickstart_recipe_is_the_run_lorakit_quickstart_makes(tmp_path):
    """`lorakit train` (no config) and `lorakit quickstart` fine-tune with the same settings."""
    import argparse
    import dataclasses

    from lorakit.commands import quickstart as command
    from lorakit.config import config_to_dict
    from lorakit.lab import quickstart
    from lorakit.run import resolve_embedded_data

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    lab = quickstart.run_config(parser.parse_args([]), Path("runs/quickstart"))
    recipe = load_config("quickstart")
    recipe = dataclasses.replace(recipe, data=resolve_embedded_data(recipe.data))
    assert config_to_dict(recipe) == config_to_dict(lab)


def test_train_without_a_config_trains_the_embedded_quickstart(tmp_path, capsys, one_thread):
    from lorakit import cli

    code = cli.main(["train", "--output_dir", str(tmp_path), "--train.max_steps", "2", "--train.progress", "none",
                     "--data.val_limit", "16"])
    assert code == 0, capsys.readouterr().err
    run_dir = tmp_path / "quickstart"
    saved = load_config(run_dir / "config.yaml")
    assert saved.model.name_or_path == "embedded" and saved.data.source == "embedded-train"
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded"
    out = capsys.readouterr().out
    assert "Answer:[[" in out  # the pre-flight preview: only the answer is trained
