"""`TrainConfig`: every knob of the one training loop, each with the help text the CLI shows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from lorakit.fielddocs import field_docs
from lorakit.schema import Config, setting
from lorakit.train.progress import PROGRESS_MODES
from lorakit.train.schedules import SCHEDULES

Distributed = Literal["auto", "ddp", "fsdp"]  # the strategies of lorakit.train.distributed, plus auto
BaseDropout = Literal["off", "keep"]  # what happens to the base model's own dropout (train/base_dropout.py)
DISTRIBUTED_MODES = get_args(Distributed)
BASE_DROPOUT_MODES = get_args(BaseDropout)
PRECISION_MODES = ("fp32", "bf16-autocast", "bf16")  # the keys of lorakit.train.precision.PRECISIONS (torch-side)
AUTO = "auto"  # a setting lorakit resolves at the start of a run (train/auto.py), printing what it chose and why
# what one optimizer step minimises (train/step.py for sft, train/preference.py for the rest); TRL's loss_type
# "sigmoid" is read as dpo
OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
REFERENCE_FREE = ("simpo", "orpo")
OBJECTIVE_SPELLINGS = {"sigmoid": "dpo"}
REFERENCES = (AUTO, "adapters_off", "copy", "precomputed")  # train/preference.py `make_reference`


@dataclass
class TrainConfig(Config):
    """Optimisation, schedule, precision and bookkeeping settings for `lorakit.train.train`.

    One optimizer step consumes `grad_accum` micro-batches of `micro_batch_size` rows (pairs, for a
    preference objective); the loss of that step is the summed token cross-entropy divided once by
    the number of trained tokens in all of them (the summed pair losses divided by the pairs), so
    accumulation never changes the gradient.
    """

    section: ClassVar[str] = "train"

    lr: float = setting(2e-4, "Peak learning rate of AdamW (reached after warmup).", gt=0)
    epochs: int = setting(1, "Passes over the training batches.", ge=1)
    max_steps: int | None = setting(
        None, "Optional cap on optimizer steps; training stops at whichever of epochs or max_steps comes first. "
              "Empty means no cap.", ge=1)
    micro_batch_size: int = setting(
        4, "Rows per forward/backward pass (pairs, each two rows, for a preference objective). The caller builds "
           "batches of this size; the loop only sees the batches.", ge=1)
    grad_accum: int = setting(
        1, "Micro-batches accumulated into one optimizer step (effective batch = micro_batch_size x grad_accum).",
        ge=1)
    schedule: str = setting("cosine", "Learning-rate shape after warmup: " + ", ".join(SCHEDULES) + ".",
                            choices=SCHEDULES)
    warmup_steps: int = setting(
        0, "Steps of linear warmup from lr/warmup_steps to lr. Exclusive with warmup_ratio.", ge=0)
    warmup_ratio: float = setting(
        0.0, "Warmup as a fraction of the total steps (e.g. 0.03). Exclusive with warmup_steps.", ge=0, lt=1)
    weight_decay: float = setting(
        0.0, "AdamW decoupled weight decay, applied to matrices only (not to biases, norms or 1-D vectors).", ge=0)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW (beta1, beta2).", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float | None = setting(
        1.0, "Clip the global gradient norm to this value; empty or 0 disables clipping.", ge=0)
    precision: str = setting(
        AUTO, "Numerics: fp32 (as loaded, trainable weights in fp32); bf16-autocast (fp32 weights, bf16 "
              "matmuls); bf16 (frozen base weights stored in bf16, trainable weights fp32, bf16 matmuls); auto "
              "(the default): bf16 where the device runs bf16 natively (a CUDA GPU with bf16, a CPU with "
              "AVX512-BF16 or AMX-BF16), bf16-autocast there when every weight trains, the compute dtype of a "
              "4-bit (QLoRA) base, else fp32 (always fp32 under LORAKIT_AUTO=off). The run prints what auto "
              "chose and why.",
        choices=(AUTO, *PRECISION_MODES))
    gradient_checkpointing: bool = setting(
        False, "Recompute layer activations in the backward pass to save memory (Hugging Face models; "
               "non-reentrant, so frozen embeddings work with adapters).")
    base_dropout: BaseDropout = setting(
        "off", "The base model's own dropout (from its config, e.g. 0.1 in GPT-2 and OPT) while training: off "
               "(set to 0 for the run; the default, because inherited dropout is a regulariser nobody chose and "
               "makes packed and unpacked runs differ) or keep. Adapter dropout (lora.dropout) is separate. The "
               "run prints which is in force.")
    compile: bool | Literal["auto"] = setting(
        AUTO, "Compile each decoder layer with torch.compile (dynamic shapes; the whole model when no layer "
              "list is found). auto (the default): on when the run is long enough to pay back the compile time "
              "(planned tokens, train/auto.py) on a CPU with a C++ compiler or a CUDA GPU with Triton, else off "
              "(always off under LORAKIT_AUTO=off); the run prints what auto chose.")
    chunked_loss: bool = setting(
        True, "Take the loss from the backbone's hidden states in chunks over trained positions only, never "
              "building full-vocabulary logits (models with a plain linear head; others use the plain path). "
              "Faster and leaner with large vocabularies; equal to the plain loss up to float rounding. false: "
              "the plain path (logits, then the loss).")
    eval_every: int = setting(
        0, "Validation loss every N optimizer steps (and always after the last step); 0 means only after the "
           "last step.", ge=0)
    save_every: int = setting(
        0, "Also write a resumable checkpoint every N optimizer steps; 0: by time only (save_every_minutes).", ge=0)
    save_every_minutes: float = setting(
        10.0, "Write a resumable checkpoint once this many minutes of training have passed since the last one, so "
              "a killed run loses at most this much (the interval stretches to 20x the last write's duration, so "
              "writing never takes over 5% of the run); 0 disables. A run that has written any checkpoint also "
              "writes one after its last step, so it can be extended (--resume --train.epochs N); a run shorter "
              "than the interval writes none.", ge=0)
    keep_checkpoints: int = setting(
        2, "Newest checkpoints kept under run_dir/checkpoints; 0 keeps them all.", ge=0)
    seed: int = setting(0, "Seed for python, numpy and torch random number generators.")
    log_every: int = setting(
        1, "Write a metrics line (and sync the loss from the device) every N steps.", ge=1)
    auto_batch_halving: bool = setting(
        True, "On an out-of-memory error, split each micro-batch in halves and double accumulation for the "
              "rest of the run (same effective batch, same loss normalisation).")
    progress: str = setting(
        "auto", "Progress display: auto (a bar on a terminal or in a notebook, plain lines otherwise), bar, plain, none.",
        choices=PROGRESS_MODES)
    distributed: Distributed = setting(
        "auto", "Under torchrun (WORLD_SIZE > 1): ddp (every rank holds the model; adapters), fsdp (FSDP2 "
                "fully_shard: weights, gradients and optimizer state sharded; full fine-tuning, large bases) "
                "or auto (fsdp when every parameter trains, else ddp). grad_accum counts micro-batches per "
                "rank. Ignored in a single process.")
    objective: str = setting(
        "sft", "What training minimises: sft (cross-entropy of the trained tokens) or a preference objective over "
               "pairs of answers (data rows with prompt/chosen/rejected): dpo (Rafailov et al. 2023, the sigmoid "
               "loss; TRL's loss_type 'sigmoid'), ipo (Azar et al. 2023, squared loss on length-averaged "
               "log-ratios), simpo (Meng et al. 2024, reference-free, length-averaged, with margin simpo_gamma) or "
               "orpo (Hong et al. 2024, reference-free: NLL of the chosen answer + orpo_lambda x odds-ratio term). "
               "A preference objective's loss is the mean over the step's pairs, however they are split into "
               "micro-batches.",
        choices=(*OBJECTIVES, *OBJECTIVE_SPELLINGS))
    beta: float = setting(
        0.1, "Preference objectives: dpo's and simpo's inverse temperature beta (how far the policy may move from "
             "the reference: larger keeps it closer), ipo's regulariser (the target margin is 1/(2 beta)); also "
             "scales the logged rewards, as TRL's.", gt=0)
    label_smoothing: float = setting(
        0.0, "dpo and simpo: the assumed share of pairs whose preference label is flipped (conservative DPO, "
             "Mitchell 2023): loss = -(1-e) log sigmoid(beta d) - e log sigmoid(-beta d). 0: the plain loss.",
        ge=0, lt=0.5)
    simpo_gamma: float = setting(
        0.5, "simpo: the target reward margin gamma (TRL's simpo_gamma); the loss is -log sigmoid(beta (avg "
             "log p(chosen) - avg log p(rejected)) - gamma).", ge=0)
    orpo_lambda: float = setting(
        0.1, "orpo: the weight lambda of the odds-ratio term added to the chosen answer's NLL (TRL's ORPOConfig "
             "calls it beta).", ge=0)
    reference: str = setting(
        AUTO, "Where dpo and ipo take the reference model's log-probs: adapters_off (the same model with its "
              "adapter switched off: the base, no second copy, no memory), copy (a frozen copy of the initial "
              "trainable weights run through the same modules: the whole model's size for full fine-tuning, the "
              "adapter's size when model.init_adapter starts from a trained adapter), precomputed (one pass "
              "over the training and validation pairs before the first step, kept as two numbers per pair: no "
              "second copy and no reference forward pass per step) or auto: adapters_off for an adapter "
              "trained from scratch, copy for full fine-tuning and for an adapter started from model.init_adapter "
              "(the reference is then the base plus that adapter). The run prints its choice.",
        choices=REFERENCES)
    dist_timeout_s: float = setting(
        600.0, "Seconds any collective may wait under torchrun before the run fails; a rank that dies or hangs "
               "then ends the others with an error instead of a hang.", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective in OBJECTIVE_SPELLINGS:  # TRL's name for the same loss
            object.__setattr__(self, "objective", OBJECTIVE_SPELLINGS[self.objective])

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field rules: warmup is given one way; preference settings fit the objective."""
        found = []
        if self.warmup_steps and self.warmup_ratio:
            found.append(("warmup_ratio", "set warmup_steps or warmup_ratio, not both"))
        objective = OBJECTIVE_SPELLINGS.get(self.objective, self.objective)
        if self.label_smoothing and objective not in ("dpo", "simpo"):
            found.append(("label_smoothing", f"applies to objectives dpo and simpo, not {objective}"))
        if self.reference != AUTO and objective not in ("dpo", "ipo"):
            found.append(("reference", f"objective {objective} has no reference model (it is reference-free)"
                          if objective in REFERENCE_FREE else "applies to objectives dpo and ipo"))
        return found

    @property
    def preference(self) -> bool:
        """Whether the objective trains on pairs of answers (dpo, ipo, simpo, orpo) rather than on tokens (sft)."""
        return self.objective in PREFERENCE_OBJECTIVES

    def resolve_warmup(self, total_steps: int) -> int:
        """Warmup length in steps for a run of `total_steps` optimizer steps."""
        if self.warmup_steps:
            return min(self.warmup_steps, total_steps)
        return min(int(round(self.warmup_ratio * total_steps)), total_steps)


# fields a resumed run may change: they change when the run stops and how it is checkpointed or shown, never
# the arithmetic of the steps it shares with the run it continues (the schedule rule: train/loop.py `_Trainer.load`)
RESUMABLE_CHANGES = ("epochs", "max_steps", "save_every", "save_every_minutes", "keep_checkpoints", "progress",
                     "distributed", "dist_timeout_s")


def field_help() -> dict[str, str]:
    """Field name -> help text, in declaration order (what `--help` prints)."""
    return field_docs(TrainConfig)
