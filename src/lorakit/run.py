"""One training run, start to finish: config -> tokenizer -> data -> model -> method -> loop -> run folder.

SFT and the preference objectives (train.objective dpo, ipo, simpo, orpo) take the same path: a preference run
reads prompt/chosen/rejected rows into pairs (data/preference.py), lays them out as pair batches (chosen and
rejected rows of each pair in one micro-batch: padded, or one row per pair with its prompt once where the
shared-prompt probe passes, `resolve_pair_layout`), and the loop computes the objective's loss
(train/preference.py). A grpo run (train.objective grpo) reads prompt rows into prompts in the run's format
(data/prompts.py), loads train.rewards before anything else, and hands the loop prompt batches and the
`Rollout` its objective samples and scores with (train/grpo.py). model.init_adapter starts the run's adapter
from a saved one (e.g. DPO or GRPO on top of SFT).

`run_training(cfg)` is what `lorakit train` calls. The run folder (cfg.run_dir) ends up with:

    config.yaml        the resolved config (feed it back to `lorakit train` to repeat the run)
    metrics.jsonl      step, loss, eval loss, lr, tokens/s, trained tokens  (written by the loop)
    checkpoints/       resumable checkpoints, when train.save_every > 0     (written by the loop)
    loss_curve.png     train and eval loss against step                     (written by the loop)
    summary.json       the loop's closing numbers                           (written by the loop)
    data_stats.json    rows, examples, truncation, tokens and trained tokens of the data (`write_data_stats`)
    adapter/           the final adapter in PEFT format, or model/ (+ tokenizer) for method full
    report.md          a short human summary with a link to the loss curve
    tensorboard/, mlflow.db, wandb/, trackers.json   what train.report_to tracks locally (train/trackers.py)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError

from lorakit.adapters import apply, apply_from_folder, parameter_report, save_adapter
from lorakit.adapters.param_lora import experts_note
from lorakit.config import (RESUME_FREE_KEYS, RunConfig, apply_overrides, build_config, config_to_dict, find_recipe, method_name,
                            read_yaml, save_config)
from lorakit.data import check_packing, load_rows, make_batches, preview_example
from lorakit.data.cache import cached_tokenize
from lorakit.data.batching import pack_each_batch
from lorakit.data.preference import make_pair_batches, preview_pair, prompt_format_name, tokenize_preference_rows
from lorakit.data.prompts import make_prompt_batches, preview_prompt, prompt_rows_format, tokenize_prompt_rows
from lorakit.data.shared_prompt import make_shared_prompt_batches, shared_prompt_note, shared_prompt_problem
from lorakit.data.prompting import PromptFormat, RunRecord, special_tokens
from lorakit.data.tokenize import resolve_format, tokenize_rows, truncation_warnings
from lorakit.errors import ConfigError, DataError
from lorakit.models import (EMBEDDED_DATASETS, fingerprint, load_model, load_tokenizer, portable_name,
                            quiet_progress_bars)
from lorakit.train import distributed, train
from lorakit.train.auto import auto_enabled, resolve_packing
from lorakit.train.base_dropout import describe
from lorakit.train.checkpoint import CheckpointWriteError, holds_a_run, read_pointer
from lorakit.train.config import AUTO, GRPO
from lorakit.train.grpo import Rollout
from lorakit.train.metrics import METRICS_FILE, read_metrics
from lorakit.train.rewards import Reward, load_rewards
from lorakit.train.setup import seed_everything
from lorakit.train.trackers import require_trackers

CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.md"
DATA_STATS_FILE = "data_stats.json"

Log = Callable[[str], None]
Layout = Callable[..., Any]  # make_batches' signature without `pack`: examples -> an epoch's micro-batches


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    output: Path  # the adapter folder, or the full model folder for method full
    model: Any  # the trained model (adapter still attached), e.g. to evaluate it next
    tokenizer: Any
    summary: Any  # lorakit.train.TrainSummary
    data_stats: Any  # lorakit.data.TokenizeStats of the training rows
    report: Path

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The records of the run folder's metrics.jsonl (step, loss, eval_loss, lr, tokens/s, ...)."""
        return read_metrics(self.run_dir / METRICS_FILE)


# ----------------------------------------------------------------------------- run folder


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.update(_flat(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value})
    return out


def check_resume_config(saved: dict, current: dict) -> None:
    """Refuse to resume a run with a config that would change its numbers."""
    old, new = _flat(saved), _flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS)
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"cannot resume with a different config ({details}); resume with the run "
                          "folder's own config.yaml, or start a new run with another name")


def free_run_dir(parent: Path, base: str) -> Path:
    """The first of parent/base, parent/base-2, parent/base-3, ... that is absent or empty: the one
    rule for naming a new run, so a run never writes into an earlier one."""
    candidate, number = Path(parent) / base, 1
    while candidate.exists() and any(candidate.iterdir()):
        number += 1
        candidate = Path(parent) / f"{base}-{number}"
    return candidate


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The run folder, after checking it suits a fresh run (absent or empty) or a resume."""
    run_dir = cfg.run_dir
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise ConfigError(f"cannot resume: {run_dir} holds no {CONFIG_FILE} of an earlier run")
        check_resume_config(read_yaml(config_path), config_to_dict(cfg))
    elif holds_a_run(run_dir):
        raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                          "or choose another name (--name)")
    return run_dir


# ----------------------------------------------------------------------------- model and data


def pick_device(device: str | None) -> str:
    """The configured device, else the first available of cuda, mps (Apple GPUs) and cpu."""
    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def run_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer of the run's model (cheap next to the model: the data is checked with it first)."""
    return load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                          revision=cfg.model.revision)


def load_adapted_model(cfg: RunConfig, log: Log, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model with the method applied, tokenizer), on the configured device; `tokenizer`: one already loaded."""
    model_cfg = cfg.model
    device = pick_device(model_cfg.device)
    tokenizer = tokenizer if tokenizer is not None else run_tokenizer(cfg)
    seed_everything(cfg.train.seed)  # adapter init (e.g. LoRA's A) is random: same seed, same run
    model = load_model(model_cfg.name_or_path, dtype=model_cfg.dtype, device=device,
                       trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision)
    start = model_cfg.init_adapter
    # new adapter weights join the base on its device
    model = (apply_from_folder(model, cfg.method, start) if start else apply(model, cfg.method)).to(device)
    if start:
        log(f"model.init_adapter: the {method_name(cfg.method)} adapter starts from the weights in {start}")
    log(parameter_report(model))
    for line in (experts_note(model), describe(model, cfg.train.base_dropout)):
        if line:
            log(line)
    return model, tokenizer


def stats_line(stats: Any, unit: str = "examples") -> str:
    """One line of tokenization counts (the truncation/skip report of the pre-flight check); `unit`: what the
    rows became (examples, pairs, or prompts: nothing of them is trained)."""
    if unit == "prompts":
        return (f"{stats.n_examples} prompts from {stats.n_rows} rows: {stats.n_truncated} cut from the left to "
                f"data.max_length, {stats.n_dropped} dropped, {stats.n_skipped_bad_rows} bad rows skipped; "
                f"{stats.n_tokens} prompt tokens")
    return (f"{stats.n_examples} {unit} from {stats.n_rows} rows: {stats.n_truncated} truncated "
            f"({stats.n_answers_cut} with the answer cut), {stats.n_dropped} dropped, "
            f"{stats.n_skipped_bad_rows} bad rows skipped; {stats.n_trained_tokens} of "
            f"{stats.n_tokens} tokens trained")


def data_unit(cfg: RunConfig) -> str:
    """What a run's rows become: examples (SFT), pairs (preference objectives) or prompts (grpo)."""
    return "pairs" if cfg.train.preference else "prompts" if cfg.train.objective == GRPO else "examples"


def write_data_stats(run_dir: Path, cfg: RunConfig, stats: Any, validation: int) -> Path:
    """data_stats.json: the training rows' tokenization counts (`TokenizeStats`), what they became (`data_unit`),
    data.max_length and the number of validation examples; what `lorakit report` shows as data statistics."""
    record = {"unit": data_unit(cfg), "max_length": cfg.data.max_length, "train": dataclasses.asdict(stats),
              "validation_examples": validation}
    path = run_dir / DATA_STATS_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def resolve_embedded_data(data_cfg: Any) -> Any:
    """The data config with the embedded dataset names ('embedded-train', 'embedded-eval',
    'embedded-general') as `source`/`val_source` replaced by their files inside lorakit."""
    named = {key: getattr(data_cfg, key) for key in ("source", "val_source")}
    paths = {key: str(EMBEDDED_DATASETS[value]) for key, value in named.items()
             if isinstance(value, str) and value in EMBEDDED_DATASETS}
    return dataclasses.replace(data_cfg, **paths) if paths else data_cfg


def tokenize_data(cfg: RunConfig, tokenizer: Any, log: Log) -> tuple[list, list, Any, PromptFormat]:
    """(train examples, validation examples, train stats, the prompt format), after the pre-flight preview; for a
    preference objective the examples are pairs."""
    train_rows, val_rows = load_rows(resolve_embedded_data(cfg.data))
    if cfg.method.media_slots() and cfg.train.objective != "sft":
        raise ConfigError(f"method {method_name(cfg.method)} trains with train.objective sft only, not "
                          f"{cfg.train.objective}")
    if cfg.train.preference:
        return tokenize_pairs(cfg, tokenizer, log, train_rows, val_rows)
    if cfg.train.objective == GRPO:
        return tokenize_prompts(cfg, tokenizer, log, train_rows, val_rows)
    prompt = PromptFormat.of_run(cfg.data, resolve_format(train_rows, cfg.data).name, tokenizer)
    slots = cfg.method.media_slots()  # a modality method: images become soft tokens (rows with them are not cached)
    tokenize = functools.partial(tokenize_rows, slots=slots) if slots else functools.partial(cached_tokenize, log=log)
    train_examples, stats = tokenize(train_rows, tokenizer, cfg.data)
    if not train_examples:
        raise DataError(f"no training examples are left after tokenization ({stats_line(stats)})")
    val_examples, val_stats = tokenize(val_rows, tokenizer, cfg.data)
    log("pre-flight: one training example, trained tokens in [[...]]:")
    log(preview_example(next((ex for ex in train_examples if "media" in ex), train_examples[0]), tokenizer, slots))
    log(f"data: {stats_line(stats)}; {len(val_examples)} validation examples")
    for line in [*truncation_warnings(stats, cfg.data), *truncation_warnings(val_stats, cfg.data, "validation rows")]:
        log(line)
    return train_examples, val_examples, stats, prompt


def tokenize_pairs(cfg: RunConfig, tokenizer: Any, log: Log, train_rows: list, val_rows: list
                   ) -> tuple[list, list, Any, PromptFormat]:
    """`tokenize_data` for a preference objective: rows -> pairs (chosen and rejected sharing one prompt)."""
    resolve_format(train_rows, cfg.data, pairs=True)  # SFT rows under a preference objective: the one error
    prompt = PromptFormat.of_run(cfg.data, prompt_format_name(train_rows, cfg.data), tokenizer)
    began = time.perf_counter()
    train_pairs, stats = tokenize_preference_rows(train_rows, tokenizer, cfg.data)
    if not train_pairs:
        raise DataError(f"no training pairs are left after tokenization ({stats_line(stats, 'pairs')})")
    val_pairs, val_stats = tokenize_preference_rows(val_rows, tokenizer, cfg.data)
    log(f"data: tokenized {len(train_rows) + len(val_rows):,} preference rows in {time.perf_counter() - began:.1f} s "
        "(preference rows are not cached)")
    log("pre-flight: one training pair, trained tokens in [[...]]:")
    log(preview_pair(train_pairs[0], tokenizer))
    log(f"data: {stats_line(stats, 'pairs')}; {len(val_pairs)} validation pairs")
    for line in [*truncation_warnings(stats, cfg.data), *truncation_warnings(val_stats, cfg.data, "validation rows")]:
        log(line)
    return train_pairs, val_pairs, stats, prompt


def tokenize_prompts(cfg: RunConfig, tokenizer: Any, log: Log, train_rows: list, val_rows: list
                     ) -> tuple[list, list, Any, PromptFormat]:
    """`tokenize_data` for grpo: prompt rows -> prompts in the run's format, training and validation prompts
    numbered as one table (the rollout's)."""
    prompt = PromptFormat.of_run(cfg.data, prompt_rows_format(train_rows, cfg.data), tokenizer)
    train_prompts, stats = tokenize_prompt_rows(train_rows, tokenizer, cfg.data, prompt)
    val_prompts, _ = tokenize_prompt_rows(val_rows, tokenizer, cfg.data, prompt, first_index=len(train_prompts))
    log("pre-flight: one training prompt as the model sees it:")
    log(preview_prompt(train_prompts[0], tokenizer))
    log(f"data: {stats_line(stats, 'prompts')}; {len(val_prompts)} validation prompts (one greedy completion "
        "each at every evaluation)")
    return train_prompts, val_prompts, stats, prompt


def make_rollout(model: Any, tokenizer: Any, prompt: PromptFormat, prompts: list,
                 rewards: list[tuple[str, float, Reward]]) -> Rollout:
    """What a grpo run samples from: the prompt table, the rewards, and the stop tokens: EOS, the format's end of
    turn, and the model's generation config's EOS ids (as TRL's)."""
    stops = prompt.stop_ids(tokenizer)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return Rollout(tokenizer, prompts, rewards, frozenset(stops), pad_id_of(tokenizer))


def record_run(folder: Path, cfg: RunConfig, prompt: PromptFormat, tokenizer: Any) -> Path:
    """lorakit_run.json in the output folder: the prompt format, the base model and its fingerprint."""
    return RunRecord(prompt, portable_name(cfg.model.name_or_path), cfg.model.revision,
                     fingerprint(cfg.model.name_or_path), prompt.end_of_turn(tokenizer),
                     special_tokens(tokenizer)).write(folder)


def epoch_positions(examples: list, cfg: RunConfig, layout: Layout) -> int:
    """Positions the model computes in epoch 0 with `layout` (rows padded to their micro-batch's longest)."""
    batches = layout(examples, cfg.train.micro_batch_size, max_length=cfg.data.max_length, pad_id=0,
                     seed=cfg.train.seed, epoch=0)
    return sum(len(rows) * max(rows) for rows in batches.row_lengths())


def packing_effect(examples: list, cfg: RunConfig) -> str:
    """What packing each micro-batch saves over padding it: computed positions in epoch 0."""
    return (f"each micro-batch keeps its {cfg.train.micro_batch_size} examples, packed: "
            f"{epoch_positions(examples, cfg, pack_each_batch):,} positions an epoch instead of "
            f"{epoch_positions(examples, cfg, functools.partial(make_batches, pack=False)):,} padded")


def resolve_pair_layout(cfg: RunConfig, model: Any, pairs: list, log: Log) -> Layout:
    """How a preference run lays out its pairs: padded pairs (data.packing false; `make_pair_batches`), or one row
    per pair with the prompt once (`make_shared_prompt_batches`), the same pairs in the same micro-batches:
    data.packing true where its probe passes on the model in hand (an error when it fails), auto where it passes
    (else padded, saying why; padded under LORAKIT_AUTO=off). auto's line is logged."""
    if cfg.data.packing is False:
        return make_pair_batches
    if cfg.data.packing is True:
        found = shared_prompt_problem(model, cfg.data.max_length)
        if found is not None:
            raise DataError(f"data.packing true: {found.reason}; {found.remedy}") from found.error
        return make_shared_prompt_batches
    if not auto_enabled():
        log("pair layout: padded pairs (auto: LORAKIT_AUTO=off; data.packing=true for the shared-prompt layout)")
        return make_pair_batches
    effect = (f"{epoch_positions(pairs, cfg, make_shared_prompt_batches):,} positions an epoch instead of "
              f"{epoch_positions(pairs, cfg, make_pair_batches):,} padded")
    shared, line = shared_prompt_note(model, cfg.data.max_length, effect)
    log(line)
    return make_shared_prompt_batches if shared else make_pair_batches


def resolve_run_packing(cfg: RunConfig, model: Any, examples: list, log: Log) -> Layout:
    """How the run lays out its micro-batches: padded; packed rows (data.packing true, checked by the leak
    probe: an error when it fails); or, for auto where the probe passes, the unpacked micro-batches each
    packed (`pack_each_batch`: the same steps as unpacked, without the padding). auto's line is logged.
    Preference pairs: `resolve_pair_layout`; grpo's prompts: padded prompt batches (what it trains on is sampled)."""
    if cfg.train.preference:
        return resolve_pair_layout(cfg, model, examples, log)
    if cfg.train.objective == GRPO:
        if cfg.data.packing is True:
            raise DataError("data.packing true: train.objective grpo trains on the completions it samples at each "
                            "step, in padded micro-batches; set data.packing auto or false")
        return make_prompt_batches
    if any("media" in example for example in examples):  # soft tokens enter row by row: never packed
        if cfg.data.packing is True:
            raise DataError("data.packing true: rows with images cannot be packed (their soft tokens enter the "
                            "input embeddings row by row); set data.packing auto or false")
        log("packing: off (the rows carry images, whose soft tokens enter row by row; padded micro-batches)")
        return functools.partial(make_batches, pack=False)
    if cfg.data.packing is True:
        check_packing(model, max_length=cfg.data.max_length)
        return functools.partial(make_batches, pack=True)
    choice = resolve_packing(cfg.data.packing, model, cfg.data.max_length,  # prompt tuning: the probe refuses it
                             effect=packing_effect(examples, cfg) if cfg.data.packing == AUTO else "")
    if choice.line:
        log(choice.line)
    return pack_each_batch if choice.value else functools.partial(make_batches, pack=False)


def batch_maker(examples: list, cfg: RunConfig, pad_id: int, layout: Layout) -> Callable[[int], list[dict]]:
    """train_batches(epoch) for the loop; the latest epoch's batches are kept, not rebuilt."""
    memo: dict[int, list[dict]] = {}

    def train_batches(epoch: int) -> list[dict]:
        if epoch not in memo:
            memo.clear()
            memo[epoch] = layout(examples, cfg.train.micro_batch_size, max_length=cfg.data.max_length,
                                 pad_id=pad_id, seed=cfg.train.seed, epoch=epoch)
        return memo[epoch]

    return train_batches


def eval_batches_of(examples: list, cfg: RunConfig, pad_id: int, layout: Layout) -> list[dict] | None:
    """Validation batches in a fixed order (None when there are no validation examples)."""
    if not examples:
        return None
    return layout(examples, cfg.train.micro_batch_size, max_length=cfg.data.max_length, pad_id=pad_id,
                  seed=cfg.train.seed, epoch=0, shuffle=False)


def pad_id_of(tokenizer: Any) -> int:
    """The pad id batches use (it never carries a loss)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
    return int(pad)


# ----------------------------------------------------------------------------- outputs


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(result: RunResult, cfg: RunConfig, wall_s: float, choices: Sequence[str] = ()) -> Path:
    """report.md: what trained, how fast, how well, and where the outputs are; `choices`: the lines of the
    settings auto chose."""
    s, stats = result.summary, result.data_stats
    share = 100.0 * s.trainable_params / max(1, s.total_params)
    eval_line = (f"{_fmt(s.best_eval_loss)} (step {s.best_eval_step})" if s.best_eval_loss is not None
                 else "n/a (no validation rows)")
    lines = [
        f"# Run `{cfg.name}`",
        "",
        f"- model: `{cfg.model.name_or_path}`, method: `{method_name(cfg.method)}`",
        f"- trainable parameters: {s.trainable_params:,} of {s.total_params:,} ({share:.4f}%)",
        f"- data: {stats_line(stats, data_unit(cfg))}",
        f"- steps: {s.steps} ({s.epochs:.2f} epochs), trained tokens: {s.trained_tokens:,}",
        f"- training time: {s.wall_time_s:.1f} s ({wall_s:.1f} s for the whole command), "
        f"{s.tokens_per_s:,.0f} tokens/s",
        f"- final training loss: {_fmt(s.final_loss)}; best eval loss: {eval_line}",
        *preference_lines(result, cfg),
        *grpo_lines(result, cfg),
        f"- output: `{result.output.name}/`" + (f" (resumed from `{s.resumed_from}`)" if s.resumed_from else ""),
        *(f"- {line}" for line in choices),
        "",
        "![loss curve](loss_curve.png)",
        "",
        f"Repeat this run with `lorakit train {result.run_dir / CONFIG_FILE} --name NEW_NAME`.",
        "",
    ]
    path = result.run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def preference_lines(result: RunResult, cfg: RunConfig) -> list[str]:
    """report.md's lines on a preference objective: its settings and the first and last logged reward numbers."""
    if not cfg.train.preference:
        return []
    logged = [r for r in result.metrics if "rewards/accuracies" in r]
    lines = [f"- objective: {cfg.train.objective}, beta {cfg.train.beta}; losses are means per pair"]
    for name, record in (("first", logged[0]), ("last", logged[-1])) if logged else ():
        lines.append(f"- {name} logged step ({record['step']}): reward accuracy {record['rewards/accuracies']:.3f}, "
                     f"margin {record['rewards/margins']:.4f} (chosen {record['rewards/chosen']:.4f}, rejected "
                     f"{record['rewards/rejected']:.4f})")
    evals = [r for r in logged if "eval_rewards/accuracies" in r]
    if evals:
        lines.append(f"- validation pairs at step {evals[-1]['step']}: reward accuracy "
                     f"{evals[-1]['eval_rewards/accuracies']:.3f}, margin {evals[-1]['eval_rewards/margins']:.4f}")
    return lines


def grpo_lines(result: RunResult, cfg: RunConfig) -> list[str]:
    """report.md's lines on a grpo run: its settings, and the first and last logged rewards, lengths and speeds."""
    if cfg.train.objective != GRPO:
        return []
    t = cfg.train
    logged = [r for r in result.metrics if "reward" in r]
    lines = [f"- objective: grpo, {t.num_generations} completions per prompt (temperature {t.temperature}, at most "
             f"{t.max_completion_length} tokens), loss {t.grpo_loss_type}, KL beta {t.grpo_beta}; losses are "
             f"{'means per completion' if t.grpo_loss_type == 'grpo' else 'per-token'}"]
    for name, record in (("first", logged[0]), ("last", logged[-1])) if logged else ():
        speeds = "".join(f", {label} {record[key]:,.0f} tokens/s" for key, label in (
            ("sampling_tokens_per_s", "sampling"), ("train_tokens_per_s", "training")) if key in record)
        share = f", sampling {100 * record['sampling_share']:.0f}% of the time" if "sampling_share" in record else ""
        lines.append(f"- {name} logged step ({record['step']}): reward {record['reward']:.3f} (std within groups "
                     f"{record.get('reward_std', float('nan')):.3f}), completion length "
                     f"{record['completions/mean_length']:.1f}{speeds}{share}")
    evals = [r for r in logged if "eval_reward" in r]
    if evals:
        lines.append(f"- validation prompts (one greedy completion each) at step {evals[-1]['step']}: reward "
                     f"{evals[-1]['eval_reward']:.3f}" + (f" (step {evals[0]['step']}: {evals[0]['eval_reward']:.3f})"
                                                           if len(evals) > 1 else ""))
    return lines


def run_training(cfg: RunConfig, *, resume: bool = False, log: Log = print) -> RunResult:
    """Train `cfg` end to end and fill its run folder (see the module docstring)."""
    started = time.perf_counter()
    require_trackers(cfg.train.report_to)  # a missing tracker library: one line, before the data and the model
    main = distributed.start(cfg.train, full_fine_tuning=method_name(cfg.method) == "full")  # under torchrun
    log = log if main else (lambda text: None)  # rank 0 speaks for all ranks
    run_dir = check_run_dir(cfg, resume) if main else cfg.run_dir
    rewards = load_rewards(cfg.train.rewards) if cfg.train.objective == GRPO else []  # a user's module: first
    tokenizer = run_tokenizer(cfg)  # data first (read, templated, tokenized): a data mistake costs seconds,
    train_examples, val_examples, stats, prompt = tokenize_data(cfg, tokenizer, log)  # not a model load
    data_ready = time.perf_counter()
    model, tokenizer = load_adapted_model(cfg, log, tokenizer)
    model_ready = time.perf_counter()
    choices: list[str] = []  # the lines of the settings auto chose, for the log and report.md

    def say(line: str) -> None:
        choices.append(line)
        log(line)

    layout = resolve_run_packing(cfg, model, train_examples, say)  # config.yaml keeps data.packing as given
    pad_id = pad_id_of(tokenizer)
    train_batches = batch_maker(train_examples, cfg, pad_id, layout)
    eval_batches = eval_batches_of(val_examples, cfg, pad_id, layout)
    if main:
        save_config(cfg, run_dir / CONFIG_FILE)  # only now: a run that fails to start leaves no folder
        write_data_stats(run_dir, cfg, stats, len(val_examples))
    log(f"run folder: {run_dir}")
    log(f"time to first step: {time.perf_counter() - started:.1f} s (data {data_ready - started:.1f} s, model "
        f"{model_ready - data_ready:.1f} s; compiling, when on, comes with the first steps)")
    rollout = make_rollout(model, tokenizer, prompt, [*train_examples, *val_examples], rewards) if rewards else None
    summary = train(model, cfg.train, train_batches=train_batches, eval_batches=eval_batches,
                    run_dir=run_dir, resume=resume, log=say, config=config_to_dict(cfg), rollout=rollout)
    state = distributed.gathered_weights(model)  # None unless FSDP2 sharded it (then method full)
    output = run_dir / cfg.method.output  # "adapter", or "model" for full fine-tuning
    if main:
        try:
            save_adapter(model, output, portable_name(cfg.model.name_or_path), tokenizer=tokenizer, state_dict=state)
            record_run(output, cfg, prompt, tokenizer)
        except (OSError, SafetensorError) as error:  # a full disk, a file-size limit: say what is safe
            latest = read_pointer(run_dir / "checkpoints")
            kept = f"checkpoint {latest} is intact: --resume continues from it" if latest else "no checkpoint exists"
            raise CheckpointWriteError(f"could not write the run's output {output}: {error}; {kept}") from error
    result = RunResult(run_dir=run_dir, output=output, model=model, tokenizer=tokenizer, summary=summary,
                       data_stats=stats, report=run_dir / REPORT_FILE)
    if main:
        write_report(result, cfg, time.perf_counter() - started, choices)
    return result


# ----------------------------------------------------------------------------- Python entry point


def _override_pairs(overrides: Mapping[str, Any] | None, dotted: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The (dotted key, value) overrides of `finetune`; a key given twice with two values is an error,
    as on the command line."""
    pairs, seen = [*(overrides or {}).items(), *dotted.items()], {}
    for key, value in pairs:
        if key in seen and seen[key] != value:
            raise ConfigError(f"'{key}' is given twice ({seen[key]!r} and {value!r})")
        seen[key] = value
    return pairs


def _raw_config(config: RunConfig | Mapping | str | Path | None) -> tuple[dict, str, Path | None]:
    """(raw config mapping, base name for a new run folder, the YAML file it came from or None)."""
    if isinstance(config, RunConfig):
        return config_to_dict(config), config.name or "run", None
    if isinstance(config, Mapping):
        return dict(config), "run", None
    if config is not None and not isinstance(config, (str, Path)):
        raise ConfigError(f"finetune: config must be a RunConfig, a dict, a YAML path or a recipe name, "
                          f"got {type(config).__name__}")
    source = Path(config) / CONFIG_FILE if config is not None and Path(config).is_dir() else None
    if source is not None and not source.is_file():
        raise ConfigError(f"'{config}' is a folder without a {CONFIG_FILE}")
    source = source or find_recipe(config if config is not None else "quickstart")
    return read_yaml(source), source.stem, source


def finetune(config: RunConfig | Mapping | str | Path | None = None, *, overrides: Mapping[str, Any] | None = None,
             resume: bool = False, log: Log = print, **dotted: Any) -> RunResult:
    """Train from a config the way `lorakit train` does, and return the run (for notebooks and scripts).

        run = lorakit.finetune("quickstart", overrides={"train.lr": 3e-4}, **{"train.max_steps": 50})
        run.run_dir, run.output, run.summary.final_loss, run.metrics, run.model, run.tokenizer

    `config` is a RunConfig, a dict shaped like a YAML config, a YAML file, a run folder or a
    shipped recipe name (None: quickstart). `overrides` and the keyword arguments are dotted config
    keys (`train.lr`, `method.r`, `name`, `method="dora"`), validated as on the command line: an
    unknown key or a bad value raises the same ConfigError. Without a `name`, the run folder is
    named after the config file (`run` for a dict), plus -2, -3, ... if taken. `resume` continues
    a run folder's latest checkpoint. The printed lines go to `log`; the progress bar follows
    `train.progress` ('auto': a bar that redraws in place in a notebook or terminal).
    """
    raw, base, source = _raw_config(config)
    cfg = build_config(apply_overrides(raw, _override_pairs(overrides, dotted)))
    return train_run(cfg, base=base, source=source, resume=resume, log=log)


def train_run(cfg: RunConfig, *, base: str, source: Path | None, resume: bool = False, log: Log = print) -> RunResult:
    """What `lorakit train` and `finetune` share: name the run (`base`, -2, -3, ...: never clobber an earlier
    run; a run folder's own config.yaml resumes that folder, wherever it was moved), train it, shut the
    process group down, and say where the report is."""
    folder = source.parent if source is not None else None
    if resume and folder is not None and source.name == CONFIG_FILE and (
            (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()):  # a run folder's own config
        cfg = dataclasses.replace(cfg, output_dir=str(folder.parent), name=folder.name)
    elif cfg.name is None:
        name = base if resume else free_run_dir(Path(cfg.output_dir), base).name
        cfg = dataclasses.replace(cfg, name=name)
    quiet_progress_bars()
    try:
        result = run_training(cfg, resume=resume, log=log)
        main = distributed.is_main_process()
    finally:
        distributed.shutdown()
    if main:
        log(f"done: {result.report}")
    return result
