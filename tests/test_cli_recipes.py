"""The recipes in configs/: shipped with the package, valid, and the lecture's classic one runs.

The bloomz recipes need the hub, so their tests keep every setting of the recipe and swap only
the model (a tiny BLOOM-architecture model saved to a temporary folder) and the data source (a
local jsonl with the real dataset's `act`/`prompt` columns), through overrides. Two recipes: the
lecture's as written (bloomz-awesome-prompts: the `prompt` text alone, every token trained, no EOS)
and the output-only-loss variant (bloomz-awesome-prompts-completion: act -> prompt).
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


def test_bloomz_recipe_is_the_lecture_recipe_as_written():
    cfg = load_config("bloomz-awesome-prompts")
    assert cfg.model.name_or_path == "bigscience/bloomz-560m"
    assert (cfg.data.source, cfg.data.limit) == ("fka/awesome-chatgpt-prompts", 50)
    assert (cfg.data.format, cfg.data.columns, cfg.data.add_eos) == ("text", {"text": "prompt"}, False)
    m = cfg.method
    assert (m.name, m.r, m.alpha, m.targets, m.dropout, m.bias) == ("lora", 4, 4, "query_key_value", 0.05, "lora_only")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.micro_batch_size, cfg.train.schedule) == (3e-2, 2, 8, "linear")
    variant = load_config("bloomz-awesome-prompts-completion")
    assert variant.data.columns == {"prompt": "act", "completion": "prompt"} and variant.data.add_eos
    assert variant.method == m and (variant.train.lr, variant.train.epochs) == (3e-2, 2)


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


def test_bloomz_completion_recipe_runs_offline_on_a_tiny_bloom(tiny_bloom_dir):
    from peft import PeftModel

    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "bloomz-awesome-prompts-completion",
                             "--model.name_or_path", str(tiny_bloom_dir / "bloom"),
                             "--data.source", str(tiny_bloom_dir / "prompts.jsonl")],
                            cwd=tiny_bloom_dir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[[I want you to act as a linux terminal." in result.stdout  # pre-flight: the answer is trained
    assert "50 examples from 50 rows" in result.stdout  # the first 50 rows
    run_dir = tiny_bloom_dir / "runs" / "bloomz-awesome-prompts-completion"
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


def _as_written(tiny_bloom_dir: Path):
    return load_config("bloomz-awesome-prompts", [("model.name_or_path", str(tiny_bloom_dir / "bloom")),
                                                   ("data.source", str(tiny_bloom_dir / "prompts.jsonl"))])


def test_bloomz_recipe_as_written_trains_every_token_of_the_prompt_text(tiny_bloom_dir):
    """The lecture's data path: `act` dropped, the `prompt` text tokenized as the tokenizer does alone, every token
    a target (labels == input ids where not padding), no EOS appended."""
    from lorakit.data.batching import collate_padded
    from lorakit.models import load_tokenizer
    from lorakit.run import pad_id_of, tokenize_data

    cfg = _as_written(tiny_bloom_dir)
    tokenizer = load_tokenizer(str(tiny_bloom_dir / "bloom"))
    examples, _, stats, prompt = tokenize_data(cfg, tokenizer, log=lambda line: None)
    rows = awesome_prompts_rows()[:50]
    assert len(examples) == 50 and prompt.format == "text"
    for example, row in zip(examples, rows):
        assert example["input_ids"] == tokenizer(row["prompt"])["input_ids"]  # the prompt alone: no act, no EOS
        assert example["labels"] == example["input_ids"]  # every token trained
        assert example["input_ids"][-1] != tokenizer.eos_token_id
    batch = collate_padded(examples[:8], pad_id_of(tokenizer))
    real = batch["attention_mask"].bool()
    # shifted labels: the target at t is the input at t + 1, for every real token; padding is never a target
    assert torch.equal(batch["labels"][:, :-1][real[:, 1:]], batch["input_ids"][:, 1:][real[:, 1:]])
    assert (batch["labels"][~real] == -100).all()


def test_bloomz_recipe_as_written_trains_and_generates_with_the_lectures_penalty(tiny_bloom_dir, tmp_path):
    run = lorakit.finetune(_as_written(tiny_bloom_dir), overrides={"output_dir": str(tmp_path)}, log=lambda line: None)
    losses = [r["loss"] for r in run.metrics if r.get("loss") is not None]
    assert len(losses) == 14  # 2 epochs x 7 batches of 8 (50 rows)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    saved = json.loads((run.output / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["bias"]) == (4, 4, 0.05, "lora_only")

    prompt = "I want you to act as a motivational coach. "
    merged = lorakit.merge(lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir / "bloom"),
                                                run.output)).eval()
    ids = run.tokenizer(prompt, return_tensors="pt")["input_ids"]
    answers = {}
    for penalty in (1.0, 1.5, 10.0):  # the lecture's 1.5, and one large enough to change this tiny model's path
        ours = lorakit.generate(prompt, adapter=run.output, model=str(tiny_bloom_dir / "bloom"), max_new_tokens=12,
                                repetition_penalty=penalty, log=lambda line: None)[0]
        with torch.no_grad():  # the lecture's call: model.generate(..., repetition_penalty=1.5), greedy
            theirs = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                     repetition_penalty=penalty, do_sample=False,
                                     eos_token_id=run.tokenizer.eos_token_id)
        assert ours == run.tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True), penalty
        answers[penalty] = ours
    assert answers[10.0] != answers[1.0]  # the penalty reaches the decoder


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
