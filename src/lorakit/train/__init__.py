"""The training room: one loop for every method, with checkpoints, metrics and progress.

    from lorakit.train import TrainConfig, train
    summary = train(model, TrainConfig(lr=1e-3, epochs=2, grad_accum=4, save_every=50),
                    train_batches=lambda epoch: batches_for(epoch), eval_batches=val_batches,
                    run_dir="runs/demo")

Names are exported lazily so that reading `TrainConfig` (for `--help`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "lorakit.train.config",
    "field_help": "lorakit.train.config",
    "train": "lorakit.train.loop",
    "TrainSummary": "lorakit.train.metrics",
    "read_metrics": "lorakit.train.metrics",
    "PRECISIONS": "lorakit.train.precision",
    "PROGRESS_MODES": "lorakit.train.progress",
    "SCHEDULES": "lorakit.train.schedules",
    "lr_factor": "lorakit.train.schedules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
