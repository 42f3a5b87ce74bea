"""`TrainConfig`: every knob of the one training loop, each with the help text the CLI shows."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from lorakit import dtypes
from lorakit.fielddocs import field_docs
from lorakit.schema import Config, setting
from lorakit.train.progress import PROGRESS_MODES
from lorakit.train.schedules import SCHEDULES

Distributed = Literal["auto", "ddp", "fsdp"]  # the strategies of lorakit.train.distributed, plus auto
BaseDropout = Literal["off", "keep"]  # what happens to the base model's own dropout (train/base_dropout.py)
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]  # the keys of lorakit.train.trackers.TRACKERS
DISTRIBUTED_MODES = get_args(Distributed)
BASE_DROPOUT_MODES = get_args(BaseDropout)
# the keys of lorakit.train.precision.PRECISIONS (torch-side); the fp16 modes scale the loss (train/precision.py)
PRECISION_MODES = ("fp32", "bf16-autocast", "bf16", "fp16-autocast", "fp16")
AUTOCAST = "-autocast"  # a mode's suffix: weights stay as they are, matmuls run in the dtype before it
AUTO = "auto"  # a setting lorakit resolves at the start of a run (train/auto.py), printing what it chose and why
# what one optimizer step minimises (train/step.py for sft, train/preference.py for the preference objectives,
# train/grpo.py for grpo); TRL's loss_type "sigmoid" is read as dpo
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
GRPO = "grpo"
OBJECTIVES = ("sft", *PREFERENCE_OBJECTIVES, GRPO)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # lorakit.train.grpo_loss.GRPO_LOSS_TYPES (torch-side)
REWARD_SCALES = ("group", "batch", "none")  # lorakit.train.grpo_loss.ADVANTAGE_SCALES (torch-side)
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
        4, "Rows per forward/backward pass (pairs, each two rows, for a preference objective; prompts, each with its "
           "num_generations sampled completions, for grpo, so a group is never split). The caller builds "
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
              "matmuls); bf16 (frozen base weights stored in bf16, trainable weights fp32, bf16 matmuls); "
              "fp16-autocast and fp16 (the same in fp16, with dynamic loss scaling: a step whose gradients "
              "overflow is skipped and the scale halved; metrics log loss_scale and skipped_steps); auto "
              "(the default): bf16 where the device runs bf16 natively (a CUDA GPU with bf16, a CPU with "
              "AVX512-BF16 or AMX-BF16), bf16-autocast there when every weight trains; fp16 (fp16-autocast) on "
              "a CUDA GPU without bf16 (T4, V100); the compute dtype of a 4-bit (QLoRA) base; else fp32 (always "
              "fp32 under LORAKIT_AUTO=off). The run prints what auto chose and why. Dtype aliases are accepted "
              "(float16, half, bfloat16-autocast, ...).",
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
               "micro-batches. grpo (Shao et al. 2024, reinforcement learning with verifiable rewards): for each "
               "prompt row (a `prompt` or chat `messages`, plus the fields the rewards read) the model samples "
               "num_generations completions, train.rewards scores them, and each completion's advantage is its "
               "reward relative to its group's; the clipped policy loss is normalised as grpo_loss_type says.",
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
    num_generations: int = setting(
        8, "grpo: completions sampled per prompt (G; TRL's num_generations, default 8). Each is scored by "
           "train.rewards and its advantage is its reward relative to the others of its group, so G >= 2.", ge=2)
    max_completion_length: int = setting(
        512, "grpo: the most tokens sampled per completion, its stop token included (TRL's max_completion_length); "
             "a completion that reaches it is cut there. Prompts are held to data.max_length tokens (cut from the "
             "left, BOS kept; or dropped under data.truncation drop).", ge=1)
    temperature: float = setting(
        1.0, "grpo: sampling temperature; the policy's log-probs in the loss are taken at the same temperature, as "
             "TRL's.", gt=0)
    top_p: float = setting(
        1.0, "grpo: nucleus sampling, the smallest set of tokens whose probability sums to top_p (1.0: off).",
        gt=0, le=1)
    top_k: int = setting(0, "grpo: sample among the k most likely tokens only (0: off).", ge=0)
    rewards: list[str | dict[str, Any]] = setting(
        doc="grpo: the reward functions, summed with their weights: a built-in's name (exact_match, contains, "
            "regex, length_penalty), 'module:function' (your callable f(prompts, completions, rows) -> one number "
            "per completion, imported from the current directory or sys.path), or a mapping {name, weight, "
            "options}: field (the row field holding the answer; default answer) and normalize for exact_match "
            "and contains, pattern for regex, target_length and max_length (characters) for length_penalty. "
            "A completion is the sampled text up to its stop token. e.g. [exact_match] or [{name: exact_match, "
            "field: completion}, {name: length_penalty, target_length: 40, weight: 0.5}].",
        factory=list)
    scale_rewards: str = setting(
        "group", "grpo: what each advantage (reward minus its group's mean) is divided by: group (the group's std, "
                 "GRPO and TRL's default), batch (the std of the whole step's rewards) or none (Dr. GRPO: no "
                 "division, no bias toward questions that are too easy or too hard).", choices=REWARD_SCALES)
    grpo_loss_type: str = setting(
        "dapo", "grpo: how per-token losses become the step's loss (TRL 1.16's loss_type): dapo (the default, as "
                "TRL's: the mean over every completion token of the step), bnpo (the same over the whole step "
                "here), grpo (each completion's token mean, then the mean over completions: shorter completions "
                "weigh more per token) or dr_grpo (the token sum over completions x max_completion_length: no "
                "length bias). The same however the step is split into micro-batches.",
        choices=GRPO_LOSS_TYPES)
    grpo_beta: float = setting(
        0.0, "grpo: weight of the KL penalty to the reference model (TRL's beta; its default 0 needs no reference "
             "pass). The reference is train.reference's: the base with the adapter switched off (no second copy) "
             "for an adapter trained from scratch, a frozen copy for full fine-tuning or an adapter started from "
             "model.init_adapter.", ge=0)
    grpo_epsilon: float = setting(
        0.2, "grpo: the clip range of the policy ratio below 1: ratios under 1 - epsilon get no gradient where "
             "the advantage is negative (TRL's epsilon). lorakit takes one optimisation step per rollout, so the "
             "ratio is 1 at every step and the clip does not act yet (clip_ratio/* log 0); TRL's values carry over.",
        gt=0, lt=1)
    grpo_epsilon_high: float | None = setting(
        None, "grpo: the clip range above 1 (1 + epsilon_high); empty: grpo_epsilon. DAPO's clip-higher uses 0.28.",
        gt=0)
    reference: str = setting(
        AUTO, "Where dpo and ipo take the reference model's log-probs: adapters_off (the same model with its "
              "adapter switched off: the base, no second copy, no memory), copy (a frozen copy of the initial "
              "trainable weights run through the same modules: the whole model's size for full fine-tuning, the "
              "adapter's size when model.init_adapter starts from a trained adapter), precomputed (one pass "
              "over the training and validation pairs before the first step, kept as two numbers per pair: no "
              "second copy and no reference forward pass per step) or auto: adapters_off for an adapter "
              "trained from scratch, copy for full fine-tuning and for an adapter started from model.init_adapter "
              "(the reference is then the base plus that adapter). The run prints its choice. grpo has a reference "
              "only with grpo_beta > 0 (adapters_off, copy or auto: its completions are sampled at each step, so "
              "nothing can be precomputed).",
        choices=REFERENCES)
    report_to: list[Tracker] = setting(
        doc="Experiment trackers that also receive every metrics.jsonl record, the run's config and its summary "
            "(rank 0 only), local and offline unless your environment says otherwise: tensorboard (event files in "
            "RUN_DIR/tensorboard), mlflow (a SQLite store RUN_DIR/mlflow.db, or MLFLOW_TRACKING_URI when set), "
            "wandb (offline files under RUN_DIR/wandb unless WANDB_MODE is set or you are logged in) and trackio "
            "(its own local store: TRACKIO_DIR, default ~/.cache/huggingface/trackio). Each needs its library: the "
            "extra of the same name (pip install 'lorakit[mlflow]'), or lorakit[trackers] for all four. Empty (the "
            "default): none.",
        factory=list)
    dist_timeout_s: float = setting(
        600.0, "Seconds any collective may wait under torchrun before the run fails; a rank that dies or hangs "
               "then ends the others with an error instead of a hang.", gt=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", spelled_precision(self.precision))  # float16 -> fp16, ...
        super().__post_init__()
        if self.objective in OBJECTIVE_SPELLINGS:  # TRL's name for the same loss
            object.__setattr__(self, "objective", OBJECTIVE_SPELLINGS[self.objective])

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field rules: warmup is given one way; preference and grpo settings fit the objective."""
        found = []
        if len(set(self.report_to)) < len(self.report_to):
            found.append(("report_to", "names a tracker more than once"))
        if self.warmup_steps and self.warmup_ratio:
            found.append(("warmup_ratio", "set warmup_steps or warmup_ratio, not both"))
        objective = OBJECTIVE_SPELLINGS.get(self.objective, self.objective)
        if self.label_smoothing and objective not in ("dpo", "simpo"):
            found.append(("label_smoothing", f"applies to objectives dpo and simpo, not {objective}"))
        if self.reference != AUTO and objective not in ("dpo", "ipo", GRPO):
            found.append(("reference", f"objective {objective} has no reference model (it is reference-free)"
                          if objective in REFERENCE_FREE else "applies to objectives dpo, ipo and grpo"))
        return found + (self._grpo_problems() if objective == GRPO else [
            (name, f"applies to objective grpo, not {objective}") for name in GRPO_FIELDS
            if getattr(self, name) != _DEFAULTS[name]])

    def _grpo_problems(self) -> list[tuple[str, str]]:
        """What a grpo run needs: rewards, a reference only for the KL penalty, no compiled layers."""
        found = []
        if not self.rewards:
            found.append(("rewards", "objective grpo needs at least one reward: e.g. [exact_match] (1 where the "
                                     "completion equals the row's `answer`), or 'module:function' for your own"))
        if self.reference == "precomputed":
            found.append(("reference", "objective grpo samples its completions at each step, so their reference "
                                       "log-probs cannot be precomputed: use adapters_off, copy or auto"))
        elif self.reference != AUTO and not self.grpo_beta:
            found.append(("reference", "objective grpo has a reference model only with a KL penalty (grpo_beta > 0)"))
        if self.compile is True:
            found.append(("compile", "objective grpo samples with the KV-cache decoder, whose passes of every length "
                                     "compiled layers would recompile for: set train.compile false (or auto)"))
        return found

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares the policy with a reference model: dpo, ipo; grpo with a KL penalty."""
        return self.objective in ("dpo", "ipo") or (self.objective == GRPO and self.grpo_beta > 0)

    @property
    def preference(self) -> bool:
        """Whether the objective trains on pairs of answers (dpo, ipo, simpo, orpo) rather than on tokens (sft)."""
        return self.objective in PREFERENCE_OBJECTIVES

    def resolve_warmup(self, total_steps: int) -> int:
        """Warmup length in steps for a run of `total_steps` optimizer steps."""
        if self.warmup_steps:
            return min(self.warmup_steps, total_steps)
        return min(int(round(self.warmup_ratio * total_steps)), total_steps)


# the settings only objective grpo reads (any other objective refuses a value other than the default)
GRPO_FIELDS = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "rewards",
               "scale_rewards", "grpo_loss_type", "grpo_beta", "grpo_epsilon", "grpo_epsilon_high")
_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
             for f in dataclasses.fields(TrainConfig)}

# fields a resumed run may change: they change when the run stops and how it is checkpointed or shown, never
# the arithmetic of the steps it shares with the run it continues (the schedule rule: train/loop.py `_Trainer.load`)
RESUMABLE_CHANGES = ("epochs", "max_steps", "save_every", "save_every_minutes", "keep_checkpoints", "progress",
                     "distributed", "dist_timeout_s", "report_to")


def spelled_precision(value: Any) -> Any:
    """A precision mode with its dtype spelled canonically ('float16' -> 'fp16', 'bfloat16-autocast' ->
    'bf16-autocast'); any other value unchanged (the field's choices refuse it)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    dtype, autocast = (text[: -len(AUTOCAST)], AUTOCAST) if text.endswith(AUTOCAST) else (text, "")
    return f"{dtypes.spelled(dtype)}{autocast}"


def field_help() -> dict[str, str]:
    """Field name -> help text, in declaration order (what `--help` prints)."""
    return field_docs(TrainConfig)
