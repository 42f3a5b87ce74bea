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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from lorakit.lab.corpus import build_corpus, corpus_sha256
from lorakit.schema import Config, setting
from lorakit.train.config import precision_names
from lorakit.train.progress import PROGRESS_MODES


@dataclass
class PretrainConfig(Config):
    """Settings of `lorakit pretrain`; the defaults rebuild the shipped embedded model."""

    section: ClassVar[str] = "pretrain"

    documents: int = setting(30000, "Corpus size in documents.", ge=1)
    seed: int = setting(0, "Seed of corpus, init, data order and splits.")
    vocab_size: int = setting(2048, "Byte-level BPE vocabulary size.", ge=1)
    hidden_size: int = setting(128, "Model width.", ge=1)
    layers: int = setting(4, "Transformer blocks.", ge=1)
    heads: int = setting(4, "Attention heads.", ge=1)
    intermediate_size: int = setting(512, "MLP width.", ge=1)
    max_length: int = setting(128, "Tokens per packed row.", ge=2)
    batch_size: int = setting(16, "Packed rows per optimizer step.", ge=1)
    epochs: int = setting(2, "Passes over the corpus.", ge=1)
    max_steps: int | None = setting(None, "Optional cap on steps.", ge=1)
    lr: float = setting(2e-3, "Peak learning rate (cosine decay).", gt=0)
    warmup_steps: int = setting(50, "Linear warmup steps.", ge=0)
    weight_decay: float = setting(0.01, "AdamW weight decay.", ge=0)
    precision: str = setting("bf16-autocast", "fp32 or bf16-autocast.", choices=precision_names)
    progress: str = setting("auto", "auto, bar, plain or none.", choices=PROGRESS_MODES)


def model_config(cfg: PretrainConfig, tokenizer):
    """A small Llama configuration with tied input/output embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=4 * cfg.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def text_batches(documents: list[str], tokenizer, cfg: PretrainConfig):
    """train_batches(epoch) for the loop: the documents as plain text, packed into rows."""
    from lorakit.data import DataConfig, make_batches, tokenize_rows

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
    from transformers import LlamaForCausalLM

    from lorakit.train import TrainConfig, train

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
    from lorakit.lab.facts import COUNTRIES

    rows = []
    for c in COUNTRIES:
        rows.append({"prompt": f"The capital of {c.name} is", "completion": " " + c.capital})
        rows.append({"prompt": f"{c.title} is a country in", "completion": " " + c.continent})
        rows.append({"prompt": f"The currency of {c.name} is the", "completion": " " + c.currency})
    return rows


def measure(model, tokenizer, eval_path: Path) -> dict:
    """Declarative recall (contains) and question answering (exact match) of the base model."""
    from lorakit.infer.evaluate import evaluate
    from lorakit.lab.datasets import read_jsonl

    recall = evaluate(model, tokenizer, recall_rows(), max_new_tokens=8, batch_size=64)
    qa = evaluate(model, tokenizer, read_jsonl(eval_path), max_new_tokens=16, batch_size=64)
    return {"declarative_recall": recall["contains"], "heldout_qa_exact_match": qa["exact_match"],
            "heldout_qa_contains": qa["contains"]}


def pretrain(cfg: PretrainConfig, out: Path) -> dict:
    """Build corpus, tokenizer, model and datasets into `out`; return the recipe (also saved)."""
    from lorakit.lab.datasets import build_datasets
    from lorakit.lab.tokenizer import build_tokenizer

    started = time.time()
    out = Path(out)
    documents = build_corpus(cfg.documents, cfg.seed)
    tokenizer = build_tokenizer(documents, cfg.vocab_size, model_max_length=4 * cfg.max_length)
    model, summary = train_model(documents, tokenizer, cfg, out / "run")
    model.save_pretrained(out / "model")  # safetensors
    tokenizer.save_pretrained(out / "model")
    counts = build_datasets(out / "data", documents, seed=cfg.seed)
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
