"""The training room: one loop for every method, with checkpoints, metrics and progress.

    from lorakit.train import TrainConfig, train
    summary = train(model, TrainConfig(lr=1e-3, epochs=2, grad_accum=4, save_every=50),
                    train_batches=lambda epoch: batches_for(epoch), eval_batches=val_batches,
                    run_dir="runs/demo")

Names are exported lazily so that reading `TrainConfig` (for `--help`) does not import torch.
"""
from __future__ import annotations

from lorakit._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
