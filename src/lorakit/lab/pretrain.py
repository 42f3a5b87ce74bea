"""The embedded model's pre-training (`lorakit pretrain`, commands/pretrain.py), through lorakit's own loop.

Steps: generate the declarative corpus (`lorakit.lab.corpus`), train a byte-level BPE tokenizer
on it, initialise a small Llama-architecture model, and train it with `lorakit.train.train` on
the corpus in plain-text mode with packing (`lorakit.data`, format "text"). The folder it writes
holds model/ (safetensors weights, config, tokenizer), data/ (the instruction dataset, split by
country, and the general-text set), run/ (metrics, loss curve) and recipe.json (everything
needed to rebuild it: settings, seed, corpus sha256, steps, wall time, measured recall).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.data import DataConfig, make_batches, tokenize_rows
from lorakit.infer.evaluate import evaluate
from lorakit.lab.config import PretrainConfig
from lorakit.lab.corpus import build_corpus, corpus_sha256
from lorakit.lab.datasets import build_datasets, read_jsonl
from lorakit.lab.facts import COUNTRIES
from lorakit.lab.preference import write_preference_sets
from lorakit.lab.tokenizer import build_tokenizer
from lorakit.train import TrainConfig, train


def model_config(cfg: PretrainConfig, tokenizer):
    """A small Llama configuration with tied input/output embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=4 * cfg.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def text_batches(documents: list[str], tokenizer, cfg: PretrainConfig):
    """train_batches(epoch) for the loop: the documents as plain text, packed into rows."""
    data_cfg = DataConfig(format="text", max_length=cfg.max_length, truncation="end",
                          packing=True)
    examples, _ = tokenize_rows([{"text": d} for d in documents], tokenizer, data_cfg)

    memo: dict[int, list[dict]] = {}  # the loop may ask for an epoch more than once

    def batches(epoch: int) -> list[dict]:
        if epoch not in memo:
            memo.clear()
            memo[epoch] = make_batches(examples, cfg.batch_size, pack=True,
                                       max_length=cfg.max_length, pad_id=tokenizer.pad_token_id,
                                       seed=cfg.seed, epoch=epoch)
        return memo[epoch]

    return batches


def train_model(documents: list[str], tokenizer, cfg: PretrainConfig, run_dir: Path):
    """Initialise the model from `cfg` and train it on `documents`; returns (model, summary)."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg, tokenizer))
    batches = text_batches(documents, tokenizer, cfg)
    train_cfg = TrainConfig(
        lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, micro_batch_size=cfg.batch_size,
        schedule="cosine", warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        precision=cfg.precision, seed=cfg.seed, log_every=10, progress=cfg.progress)
    summary = train(model, train_cfg, train_batches=batches, eval_batches=None, run_dir=run_dir)
    return model, summary


def recall_rows() -> list[dict]:
    """Declarative probes of every fact, in the corpus's own phrasing."""
    rows = []
    for c in COUNTRIES:
        rows.append({"prompt": f"The capital of {c.name} is", "completion": " " + c.capital})
        rows.append({"prompt": f"{c.title} is a country in", "completion": " " + c.continent})
        rows.append({"prompt": f"The currency of {c.name} is the", "completion": " " + c.currency})
    return rows


def measure(model, tokenizer, eval_path: Path) -> dict:
    """Declarative recall (contains) and question answering (exact match) of the base model."""
    recall = evaluate(model, tokenizer, recall_rows(), max_new_tokens=8, batch_size=64)
    qa = evaluate(model, tokenizer, read_jsonl(eval_path), max_new_tokens=16, batch_size=64)
    return {"declarative_recall": recall["contains"], "heldout_qa_exact_match": qa["exact_match"],
            "heldout_qa_contains": qa["contains"]}


def pretrain(cfg: PretrainConfig, out: Path) -> dict:
    """Build corpus, tokenizer, model and datasets into `out`; return the recipe (also saved)."""
    started = time.time()
    out = Path(out)
    documents = build_corpus(cfg.documents, cfg.seed)
    tokenizer = build_tokenizer(documents, cfg.vocab_size, model_max_length=4 * cfg.max_length)
    model, summary = train_model(documents, tokenizer, cfg, out / "run")
    model.save_pretrained(out / "model")  # safetensors
    tokenizer.save_pretrained(out / "model")
    counts = build_datasets(out / "data", documents, seed=cfg.seed) | write_preference_sets(out / "data", cfg.seed)
    recipe = {
        "config": asdict(cfg),
        "corpus": {"documents": len(documents), "characters": sum(map(len, documents)),
                   "sha256": corpus_sha256(documents)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": summary.to_dict(),
        "datasets": counts,
        "measured": measure(model, tokenizer, out / "data" / "sft_eval.jsonl"),
        "total_wall_time_s": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "reproduce": "lorakit pretrain --out DIR (the defaults are this recipe's config)",
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe
