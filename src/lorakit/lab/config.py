"""The lab's settings, torch-free so that `lorakit pretrain --help` and `lorakit quickstart --help` read
them without importing torch: `PretrainConfig` (lab/pretrain.py) and the quickstart's run folder
(lab/quickstart.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lorakit.schema import Config, setting
from lorakit.train.config import PRECISION_MODES
from lorakit.train.progress import PROGRESS_MODES

QUICKSTART_OUT = Path("runs/quickstart")  # `lorakit quickstart`'s run folder; then -2, -3, ... when taken


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
    precision: str = setting("bf16-autocast", "fp32 or bf16-autocast.", choices=PRECISION_MODES)
    progress: str = setting("auto", "auto, bar, plain or none.", choices=PROGRESS_MODES)
