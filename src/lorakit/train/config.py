"""`TrainConfig`: every knob of the one training loop, each with the help text the CLI shows."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from lorakit.errors import ConfigError
from lorakit.train.progress import PROGRESS_MODES
from lorakit.train.schedules import SCHEDULES

DISTRIBUTED_MODES = ("auto", "ddp", "fsdp")  # the strategies of lorakit.train.distributed, plus auto
BASE_DROPOUT_MODES = ("off", "keep")  # what happens to the base model's own dropout (train/base_dropout.py)


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and bookkeeping settings for `lorakit.train.train`.

    One optimizer step consumes `grad_accum` micro-batches of `micro_batch_size` rows; the loss
    of that step is the summed token cross-entropy divided once by the number of trained tokens
    in all of them, so accumulation never changes the gradient.
    """

    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate of AdamW (reached after warmup)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the training batches."})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Optional cap on optimizer steps; training stops at whichever of epochs or max_steps "
                          "comes first. Empty means no cap."},
    )
    micro_batch_size: int = field(
        default=4,
        metadata={"help": "Rows per forward/backward pass. The caller builds batches of this size; the loop "
                          "only sees the batches."},
    )
    grad_accum: int = field(
        default=1,
        metadata={"help": "Micro-batches accumulated into one optimizer step (effective batch = "
                          "micro_batch_size x grad_accum)."},
    )
    schedule: str = field(
        default="cosine",
        metadata={"help": "Learning-rate shape after warmup: " + ", ".join(SCHEDULES) + "."},
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Steps of linear warmup from lr/warmup_steps to lr. Exclusive with warmup_ratio."}
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Warmup as a fraction of the total steps (e.g. 0.03). Exclusive with warmup_steps."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW decoupled weight decay, applied to matrices only (not to biases, norms or "
                          "1-D vectors)."},
    )
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2)."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this value; empty or 0 disables clipping."}
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "Numerics: fp32 (as loaded, trainable weights in fp32); bf16-autocast (fp32 weights, "
                          "bf16 matmuls); bf16 (frozen base weights stored in bf16, trainable weights fp32, "
                          "bf16 matmuls)."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute layer activations in the backward pass to save memory (Hugging Face "
                          "models; non-reentrant, so frozen embeddings work with adapters)."},
    )
    base_dropout: str = field(
        default="off",
        metadata={"help": "The base model's own dropout (from its config, e.g. 0.1 in GPT-2 and OPT) while "
                          "training: off (set to 0 for the run; the default, because inherited dropout is a "
                          "regulariser nobody chose and makes packed and unpacked runs differ) or keep. Adapter "
                          "dropout (lora.dropout) is separate. The run prints which is in force."},
    )
    compile: bool = field(default=False, metadata={"help": "Compile each decoder layer with torch.compile "
                                                           "(dynamic shapes; the whole model when no layer "
                                                           "list is found)."})
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Take the loss from the backbone's hidden states in chunks over trained positions "
                          "only, never building full-vocabulary logits (models with a plain linear head; "
                          "others use the plain path). Faster and leaner with large vocabularies; equal to "
                          "the plain loss up to float rounding. false: the plain path (logits, then the loss)."},
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "Validation loss every N optimizer steps (and always after the last step); 0 means "
                          "only after the last step."},
    )
    save_every: int = field(
        default=0, metadata={"help": "Write a resumable checkpoint every N optimizer steps; 0 disables checkpoints."}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "Newest checkpoints kept under run_dir/checkpoints; 0 keeps them all."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for python, numpy and torch random number generators."})
    log_every: int = field(
        default=1, metadata={"help": "Write a metrics line (and sync the loss from the device) every N steps."}
    )
    auto_batch_halving: bool = field(
        default=True,
        metadata={"help": "On an out-of-memory error, split each micro-batch in halves and double accumulation "
                          "for the rest of the run (same effective batch, same loss normalisation)."},
    )
    progress: str = field(
        default="auto",
        metadata={"help": "Progress display: auto (bar on a terminal, plain lines otherwise), bar, plain, none."},
    )
    distributed: str = field(
        default="auto",
        metadata={"help": "Under torchrun (WORLD_SIZE > 1): ddp (every rank holds the model; adapters), fsdp "
                          "(FSDP2 fully_shard: weights, gradients and optimizer state sharded; full fine-tuning, "
                          "large bases) or auto (fsdp when every parameter trains, else ddp). grad_accum counts "
                          "micro-batches per rank. Ignored in a single process."},
    )
    dist_timeout_s: float = field(
        default=600.0,
        metadata={"help": "Seconds any collective may wait under torchrun before the run fails; a rank that "
                          "dies or hangs then ends the others with an error instead of a hang."},
    )

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        for problem in _problems(self):
            raise ConfigError(f"train.{problem}")

    def resolve_warmup(self, total_steps: int) -> int:
        """Warmup length in steps for a run of `total_steps` optimizer steps."""
        if self.warmup_steps:
            return min(self.warmup_steps, total_steps)
        return min(int(round(self.warmup_ratio * total_steps)), total_steps)


def _problems(cfg: TrainConfig) -> list[str]:
    """Every violated constraint, as 'field: message' strings (empty when the config is valid)."""
    from lorakit.train.precision import PRECISIONS  # imports torch; keep `--help` fast

    checks = [
        ("lr", cfg.lr > 0, "must be > 0"),
        ("epochs", cfg.epochs >= 1, "must be >= 1"),
        ("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, "must be >= 1 or empty"),
        ("micro_batch_size", cfg.micro_batch_size >= 1, "must be >= 1"),
        ("grad_accum", cfg.grad_accum >= 1, "must be >= 1"),
        ("schedule", cfg.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("warmup_ratio", 0.0 <= cfg.warmup_ratio < 1.0, "must be in [0, 1)"),
        ("warmup_ratio", not (cfg.warmup_steps and cfg.warmup_ratio), "set warmup_steps or warmup_ratio, not both"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "must be two numbers in [0, 1)"),
        ("eps", cfg.eps > 0, "must be > 0"),
        ("max_grad_norm", cfg.max_grad_norm is None or cfg.max_grad_norm >= 0, "must be >= 0 or empty"),
        ("precision", cfg.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
        ("base_dropout", cfg.base_dropout in BASE_DROPOUT_MODES, f"must be one of {', '.join(BASE_DROPOUT_MODES)}"),
        ("eval_every", cfg.eval_every >= 0, "must be >= 0"),
        ("save_every", cfg.save_every >= 0, "must be >= 0"),
        ("keep_checkpoints", cfg.keep_checkpoints >= 0, "must be >= 0"),
        ("log_every", cfg.log_every >= 1, "must be >= 1"),
        ("progress", cfg.progress in PROGRESS_MODES, f"must be one of {', '.join(PROGRESS_MODES)}"),
        ("distributed", cfg.distributed in DISTRIBUTED_MODES, f"must be one of {', '.join(DISTRIBUTED_MODES)}"),
        ("dist_timeout_s", cfg.dist_timeout_s > 0, "must be > 0"),
    ]
    return [f"{name}: {message} (got {getattr(cfg, name)!r})" for name, ok, message in checks if not ok]


def field_help() -> dict[str, str]:
    """Field name -> help text, in declaration order (what `--help` prints)."""
    return {f.name: f.metadata["help"] for f in fields(TrainConfig)}
