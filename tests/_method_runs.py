"""In-process `lorakit train` runs (run_training, what the CLI calls) for the adapter-method tests."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.config import load_config
from lorakit.data import train_byte_bpe

WORDS = "apple river stone cloud tiger piano garden silver window forest candle rocket".split()
ROWS = [{"prompt": f"Copy the word {w}.", "completion": f" {w} {w}"} for w in WORDS]


@lru_cache(maxsize=None)
def _tokenizer(texts: tuple[str, ...], vocab_size: int):
    return train_byte_bpe(list(texts) * 4, vocab_size=vocab_size)


def make_workdir(root: Path, rows: list[dict] = ROWS, vocab_size: int = 300) -> Path:
    """A tiny Llama + byte-level BPE tokenizer folder (root/base) and `rows` as root/rows.jsonl."""
    tokenizer = _tokenizer(tuple(r["prompt"] + r["completion"] for r in rows), vocab_size)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_method(root: Path, method: dict, *, steps: int = 12, lr: float = 1e-2):
    """Train `method` (a YAML method mapping) for `steps` full-batch steps through run_training (one batch
    holds every row, so the per-step losses are comparable); returns its result."""
    import yaml

    from lorakit.run import run_training

    recipe = {"name": method["name"], "model": {"name_or_path": str(root / "base")}, "method": method,
              "data": {"source": str(root / "rows.jsonl"), "val_fraction": 0.0, "max_length": 48},
              "train": {"lr": lr, "epochs": 50, "max_steps": steps, "micro_batch_size": len(ROWS), "save_every": 0,
                        "log_every": 1, "progress": "none"}}
    path = root / f"{method['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = load_config(path, [("output_dir", str(root / "runs"))])
    return run_training(cfg, log=lambda line: None)


def losses(run_dir: Path) -> list[float]:
    """The training loss of every metrics record."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
