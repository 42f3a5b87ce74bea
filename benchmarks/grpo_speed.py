"""GRPO speed with LoRA: TRL's GRPOTrainer against lorakit, side by side, on one machine (issue 21, item 6).

    python benchmarks/grpo_speed.py                                   # SmolLM2-135M shape: trl, lorakit
    python benchmarks/grpo_speed.py --rounds 3 --out benchmarks/results/cpu-smollm-grpo.json
    python benchmarks/grpo_speed.py --size tiny --generations 4 --completion-length 8   # a smoke run, seconds

Both sides train the same randomly initialised model (sft_workload.build_model, saved to a folder that each side
loads itself) on the same prompts, with LoRA r=16 / alpha=32 / dropout 0 on all seven projections, the same
group size G (num_generations), prompts per optimizer step (one micro-batch of prompts x G completions), sampling
temperature, completion length, reward, learning rate (linear decay, no warmup), clipping at 1.0 and no weight
decay. The GRPO settings not named here are both sides' defaults, which agree: loss dapo (the mean over the
step's completion tokens), advantages scaled by the group's std, clip epsilon 0.2, beta 0 (no KL penalty, so no
reference model), one optimisation step per rollout. Each pipeline runs in its own forked child; the step clock
of the SFT benchmark (sft_paths.StepClock) reads the clocks after every optimizer step, the first --warmup steps
untimed; each side runs --steps optimizer steps (max_steps), one epoch of exactly --steps x --prompts prompts.

    trl        trl.GRPOTrainer(model=FOLDER, reward_funcs=[...], peft_config=LoraConfig(...)) with GRPOConfig's
               defaults except the shared settings above. TRL's docs default GRPOConfig to bf16 mixed precision
               (fp32 weights, bf16 autocast around the loss; transformers' generate samples outside it, in fp32)
               and gradient checkpointing on (off while generating), so that is what runs; it samples with
               transformers' generate (a KV cache, the G copies of a prompt as separate rows).
    trl-no-gc  the same with gradient_checkpointing=False (what a user without memory pressure sets)
    lorakit    lorakit.finetune with the config a user writes (train.objective grpo; no speed settings): every auto
               setting (precision, ...) as it resolves on this machine; it samples with lorakit.decoding.decode

The same lengths on both sides: every completion runs to exactly --completion-length tokens, so completions per
second compare like with like. TRL could be told not to stop (GRPOConfig(generation_kwargs={"suppress_tokens":
[EOS]}) or min_new_tokens); lorakit has no such setting and refuses a tokenizer without an EOS token. So the
shared model cannot emit EOS (`unreachable_eos`): both sides run with the usual EOS and stop rules, and no
completion ever ends before its last token. The prompts' token ids are the same on both sides
(`sanity.same_prompts`), and both sides' completion lengths are recorded and checked (`sanity.same_lengths`).

The prompts: each SFT workload row's prompt (sft_workload.workload_rows, prompt_template "{prompt}\\n"), with
`answer`, the first syllable (two letters) of the row's completion. The reward: lorakit's built-in `contains` on
the field answer (1 where the sampled text holds that syllable, case and spacing aside): a verifiable reward that
does not grow with length and varies within a group; the very same lorakit Reward object scores TRL's completions
(a reward function of TRL's signature around it), so both sides compute the same function.

Reported per pipeline: completions per second (wall and per CPU-second), sampled (completion) tokens per second of
sampling, the sampling share of the step time (TRL: the time in GRPOTrainer._generate_single_turn, its
generate call and end-of-sequence mask, timed around it; lorakit: its own metrics.jsonl figures, each step's sampled
tokens / sampling_tokens_per_s), peak RSS, the losses, mean reward, ratios to the first pipeline, and per
round (--rounds, the order rotated each round) the ratio of completions/s to the first pipeline and the rounds that
reach --goal (the issue's goal: 3x TRL). Losses and rewards are a record, not a learning curve.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench_sft import environment, preload
from dpo_speed import report, timed_job, user_run
from sft_paths import MemoryMeter, StepClock, interleaved_rounds, loss_logger, summarise
from sft_workload import LORA, PROMPT_TEMPLATE, SIZES, describe, workload_rows
from train_speed import _in_child

TRL_PIPELINES = {"trl": {}, "trl-no-gc": {"gradient_checkpointing": False}}  # GRPOConfig settings beyond the shared
LORAKIT_PIPELINES = {"lorakit": {}}
PIPELINES = (*TRL_PIPELINES, *LORAKIT_PIPELINES)
DEFAULT_PIPELINES = ("trl", "lorakit")
REWARD = {"name": "contains", "field": "answer"}  # lorakit.train.rewards' built-in, on both sides
AUTO_LINES = ("precision:", "compile:")  # the lines of lorakit's auto settings that apply to grpo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(DEFAULT_PIPELINES),
                        help="the first is the one the ratios are taken to")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps run but not timed")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step (one micro-batch)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt, G (TRL's default 8)")
    parser.add_argument("--completion-length", type=int, default=64,
                        help="tokens of every completion (max_completion_length; no side may stop earlier)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per child; 0 = torch's default")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the pipelines this many times, interleaved (round k starts at pipeline k mod n)")
    parser.add_argument("--goal", type=float, default=3.0,
                        help="completions/s ratio to the first pipeline counted as met (issue 21: 3x TRL)")
    parser.add_argument("--lorakit-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides for the lorakit pipeline (e.g. train.precision=fp32), to "
                             "measure one auto setting against its alternative; none by default")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 1")
    if min(args.rounds, args.prompts, args.completion_length) < 1 or args.generations < 2:
        parser.error("--rounds, --prompts and --completion-length must be at least 1, --generations at least 2")
    if args.temperature <= 0:
        parser.error("--temperature must be positive (GRPO samples)")
    if any("=" not in item for item in args.lorakit_set):
        parser.error("--lorakit-set takes KEY=VALUE items")
    size = SIZES[args.size]
    if args.completion_length >= positions(args.size) - size.min_length:
        parser.error(f"--completion-length ({args.completion_length}) leaves no room for a prompt in the "
                     f"{positions(args.size)} positions of size {args.size}")
    return args


# ----------------------------------------------------------------------------- the workload


def positions(size_name: str) -> int:
    """The model's max_position_embeddings (sft_workload.build_model): a prompt and its completion fit in it."""
    size = SIZES[size_name]
    return max(size.max_length, size.pack_length or 0)


def prompt_rows(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, str]]:
    """--steps x --prompts prompt rows (see the module docstring) whose prompt and completion fit the model."""
    n_rows, room = args.steps * args.prompts, positions(args.size) - args.completion_length
    rows = []
    for row in workload_rows(2 * n_rows + 16, SIZES[args.size], tokenizer, args.seed):
        if len(tokenizer(PROMPT_TEMPLATE.format(prompt=row["prompt"]))["input_ids"]) <= room:
            rows.append({"prompt": row["prompt"], "answer": row["completion"][:2]})
        if len(rows) == n_rows:
            return rows
    raise RuntimeError(f"only {len(rows)} of {n_rows} prompts leave room for {args.completion_length} tokens")


def prompts_digest(prompts: list[list[int]]) -> str:
    """A short hash of the distinct prompts' token ids, sorted (both sides see each prompt once, in their order)."""
    payload = json.dumps(sorted({tuple(ids) for ids in prompts}), separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def unreachable_eos(model: Any, eos_id: int, channel: int = 0, margin: float = 1e6) -> None:
    """Make token `eos_id` impossible to sample from the Llama `model` (in place), whatever the input: hidden
    channel `channel` of the residual stream is held at the embeddings' scale (config.initializer_range) for every
    token, as no layer writes to it (its rows of o_proj and down_proj are zero), so after the final RMSNorm it is
    positive at every position; the head's weight of `eos_id` on it is -margin, which puts EOS's logit thousands
    below every other one (its probability underflows to exactly 0 in fp32 and bf16). The other tokens' logits
    barely move (one channel of the hidden size is a constant); EOS is never an input, so a tied head is fine."""
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, channel] = model.config.initializer_range
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channel] = 0.0
            layer.mlp.down_proj.weight[channel] = 0.0
        model.get_output_embeddings().weight[eos_id, channel] = -margin


def setup_child(args: argparse.Namespace, workdir: Path) -> tuple[Any, list[dict[str, str]], Path]:
    """(tokenizer, rows, model folder): the job both sides build identically; the model cannot emit EOS
    (`unreachable_eos`). It is saved and dropped, so each side loads it itself, inside its measured memory."""
    import torch

    from sft_workload import build_model, make_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    tokenizer = make_tokenizer(size, args.seed)
    rows = prompt_rows(args, tokenizer)
    model_dir = workdir / "base-model"
    model = build_model(size, args.seed, tokenizer)
    unreachable_eos(model, tokenizer.eos_token_id)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    return tokenizer, rows, model_dir


def measured(args: argparse.Namespace, clock: StepClock, steps: list[dict[str, Any]], losses: list[float],
             meter: MemoryMeter, started: float) -> dict[str, Any]:
    """The steady-state figures of a run of --steps steps; `steps`: per step its completions, their summed
    lengths (sampled tokens, all trained), its sampling seconds, its mean reward and its completions' lengths
    (the distinct ones)."""
    if len(steps) != args.steps:
        raise RuntimeError(f"expected {args.steps} rollouts, one per optimizer step; got {len(steps)}")
    result = summarise(timed_job(args), clock, [s["tokens"] for s in steps], losses[:args.steps])
    timed = steps[args.warmup:]
    completions, sampling_s = sum(s["completions"] for s in timed), sum(s["sampling_s"] for s in timed)
    peak = meter.peak_mb()
    return {**result, "completions": completions, "completions_per_s": completions / result["train_seconds"],
            "completions_per_cpu_s": completions / result["cpu_seconds"],
            "step_completions": [s["completions"] for s in steps],
            "completion_lengths": sorted({n for s in steps for n in s["lengths"]}),
            "sampling_seconds": sampling_s, "sampling_share": sampling_s / result["train_seconds"],
            "sampled_tokens_per_s": result["target_tokens"] / sampling_s,
            "mean_reward": sum(s["reward"] for s in steps) / len(steps),
            "peak_mb": peak, "baseline_mb": meter.baseline_mb, "peak_delta_mb": peak - meter.baseline_mb,
            "seconds_to_first_step": clock.wall[0] - started}


# ----------------------------------------------------------------------------- TRL


def trl_reward(rewards: list) -> Any:
    """TRL's reward function (prompts, completions, **dataset columns) -> floats, around lorakit's loaded rewards."""
    from lorakit.train.rewards import score

    def contains_answer(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        total, _ = score(rewards, prompts, completions, [{"answer": a} for a in answer])
        return total.tolist()

    return contains_answer


def timed_rollouts(trainer: Any, rollouts: list[dict[str, Any]]) -> None:
    """Wrap the trainer's _generate_single_turn (prompt ids -> completion ids): per call, its seconds, prompts
    and completion lengths go to `rollouts`."""
    generate = trainer._generate_single_turn

    def timed(prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
        rollouts.append({"seconds": time.perf_counter() - start, "prompts": [list(p) for p in prompt_ids],
                         "lengths": [len(c) for c in completion_ids]})
        return completion_ids, logprobs

    trainer._generate_single_turn = timed


def run_trl(args: argparse.Namespace, pipeline: str, out: Path) -> None:
    """TRL's GRPOTrainer as its docs show it: a model folder, a reward function, a peft LoraConfig, GRPOConfig
    (child process)."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from lorakit.train.rewards import load_rewards

    disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="grpo-speed-trl-") as scratch:
        workdir = Path(scratch)
        tokenizer, rows, model_dir = setup_child(args, workdir)
        dataset = Dataset.from_list([{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "answer": r["answer"]}
                                     for r in rows])
        losses: list[float] = []
        rewards: list[float] = []
        rollouts: list[dict[str, Any]] = []

        class RewardLog(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
                if logs and "reward" in logs:
                    rewards.append(float(logs["reward"]))

        config = GRPOConfig(
            output_dir=str(workdir / "trl"), per_device_train_batch_size=args.prompts * args.generations,
            gradient_accumulation_steps=1, num_generations=args.generations,
            max_completion_length=args.completion_length, temperature=args.temperature, learning_rate=args.lr,
            num_train_epochs=1, max_steps=args.steps, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            seed=args.seed, use_cpu=True, **TRL_PIPELINES[pipeline])
        meter = MemoryMeter("cpu")
        meter.start()
        started = time.perf_counter()
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[trl_reward(load_rewards([REWARD]))], args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                     target_modules=LORA["targets"], task_type="CAUSAL_LM"),
                              callbacks=[loss_logger(losses), RewardLog()])
        trainer.remove_callback(PrinterCallback)
        timed_rollouts(trainer, rollouts)
        with StepClock("cpu") as clock:
            trainer.train()
        steps = [{"completions": len(r["lengths"]), "tokens": sum(r["lengths"]), "sampling_s": r["seconds"],
                  "lengths": r["lengths"], "reward": reward} for r, reward in zip(rollouts, rewards)]
        result = measured(args, clock, steps, losses, meter, started)
        out.write_text(json.dumps({
            **result, "pipeline": pipeline, "precision": "bf16 autocast" if config.bf16 else "fp32",
            "weights": str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "gradient_checkpointing": config.gradient_checkpointing, "num_generations": config.num_generations,
            "max_completion_length": config.max_completion_length, "beta": config.beta,
            "loss_type": config.loss_type, "threads": torch.get_num_threads(), "gpu": "none",
            "prompts_digest": prompts_digest([prompt for r in rollouts for prompt in r["prompts"]])}))


# ----------------------------------------------------------------------------- lorakit


def user_config(args: argparse.Namespace, model_dir: Path, data_file: Path, out_dir: Path) -> dict[str, Any]:
    """The config a user writes for this job: model, prompts, LoRA recipe, GRPO, optimizer; no speed settings."""
    return {"model": {"name_or_path": str(model_dir)},
            "data": {"source": str(data_file), "format": "prompt_completion", "prompt_template": PROMPT_TEMPLATE,
                     "max_length": SIZES[args.size].max_length},
            "method": {"name": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": 0.0,
                       "targets": LORA["targets"]},
            "train": {"objective": "grpo", "rewards": [REWARD], "num_generations": args.generations,
                      "max_completion_length": args.completion_length, "temperature": args.temperature,
                      "lr": args.lr, "epochs": 1, "max_steps": args.steps, "micro_batch_size": args.prompts,
                      "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                      "seed": args.seed, "progress": "none"},
            "output_dir": str(out_dir), "name": "run"}


def lorakit_prompts(rows: list[dict[str, str]], model_dir: Path, data: dict[str, Any]) -> list[list[int]]:
    """The prompts' token ids as lorakit renders them (data/prompts.py, the folder's tokenizer)."""
    from transformers import AutoTokenizer

    from lorakit.data import DataConfig
    from lorakit.data.prompting import PromptFormat
    from lorakit.data.prompts import tokenize_prompt_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(**{key: data[key] for key in ("format", "prompt_template", "max_length")})
    examples, _ = tokenize_prompt_rows(rows, tokenizer, cfg, PromptFormat.of_run(cfg, cfg.format, tokenizer))
    return [ex.input_ids for ex in examples]


def run_lorakit(args: argparse.Namespace, pipeline: str, out: Path) -> None:
    """lorakit as a user runs it: `lorakit.finetune(user_config)` (what `lorakit train CONFIG` runs) (child process)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="grpo-speed-lorakit-") as scratch:
        workdir = Path(scratch)
        _, rows, model_dir = setup_child(args, workdir)
        run = user_run(args, user_config, LORAKIT_PIPELINES[pipeline], workdir, rows, model_dir, "prompts.jsonl")
        config, lines, clock, meter, started = (run[key] for key in ("config", "lines", "clock", "meter", "started"))
        records = [r for r in run["records"] if "reward" in r]
        cumulative = [0] + [r["trained_tokens"] for r in records]
        steps = []
        for record, before in zip(records, cumulative):
            tokens, length = record["trained_tokens"] - before, record["completions/mean_length"]
            # every sampled token is trained; the lengths are all the max exactly when their mean is
            steps.append({"completions": round(tokens / length), "tokens": tokens,
                          "sampling_s": tokens / record["sampling_tokens_per_s"], "reward": record["reward"],
                          "lengths": [round(length)] if length == args.completion_length else [length]})
        result = measured(args, clock, steps, [r["loss"] for r in records], meter, started)
        out.write_text(json.dumps({
            **result, "pipeline": pipeline, "auto_choices": [line for line in lines if line.startswith(AUTO_LINES)],
            "lorakit_sampling_share": [r.get("sampling_share") for r in records],
            "num_generations": config["train"]["num_generations"],
            "max_completion_length": config["train"]["max_completion_length"], "beta": 0.0, "loss_type": "dapo",
            "prompts_digest": prompts_digest(lorakit_prompts(rows, model_dir, config["data"])),
            "threads": torch.get_num_threads(), "gpu": "none"}))


# ----------------------------------------------------------------------------- the parent


def run_child(args: argparse.Namespace, pipeline: str) -> dict[str, Any]:
    """One pipeline in a forked child (its own memory peak); returns its measurements."""
    target = run_trl if pipeline in TRL_PIPELINES else run_lorakit
    return _in_child(target, (args, pipeline), f"grpo-{pipeline}")


ROWS = [("completions/s (wall)", "completions_per_s", "{:.3f}", True),
        ("completions/CPU-s", "completions_per_cpu_s", "{:.3f}", True),
        ("sampled tokens/s", "sampled_tokens_per_s", "{:.1f}", True),
        ("sampling share", "sampling_share", "{:.2f}", False), ("peak RSS MiB", "peak_mb", "{:.0f}", True),
        ("mean reward", "mean_reward", "{:.3f}", False), ("first loss", "first_loss", "{:.4f}", False),
        ("s to end of step 1", "seconds_to_first_step", "{:.1f}", False)]


def sanity(args: argparse.Namespace, rounds: list[list[dict[str, Any]]]) -> dict[str, bool]:
    """What must hold whatever the speed: the same prompts, every completion --completion-length tokens long,
    --prompts x --generations completions at every step, on every side and in every round."""
    runs = [run for runs in rounds for run in runs]
    return {"same_prompts": all(len({r["prompts_digest"] for r in runs}) == 1 for runs in rounds),
            "same_lengths": all(r["completion_lengths"] == [args.completion_length] for r in runs),
            "same_completions": all(r["step_completions"] == [args.prompts * args.generations] * args.steps
                                    for r in runs),
            "same_group": all(r["num_generations"] == args.generations for r in runs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preload()  # bench_sft's imports, then TRL's and lorakit's entry point: once, before any child is forked
    for name in ("trl", "lorakit.run"):
        importlib.import_module(name)
    rounds = interleaved_rounds(args.pipelines, args.rounds, lambda pipeline: run_child(args, pipeline))
    runs = rounds[0]
    result = {"benchmark": "lora-grpo training speed: TRL GRPOTrainer vs lorakit",
              "command": " ".join(["python", "benchmarks/grpo_speed.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"steps": args.steps, "warmup": args.warmup, "prompts_per_step": args.prompts,
                           "num_generations": args.generations, "completion_length": args.completion_length,
                           "temperature": args.temperature, "lr": args.lr, "reward": REWARD, "beta": 0.0,
                           "loss_type": "dapo", "seed": args.seed, "threads": args.threads, "rounds": args.rounds,
                           "goal": args.goal, "lorakit_set": args.lorakit_set, **describe(args.size),
                           "lora": {**LORA, "dropout": 0.0}},
              "environment": {**environment(runs), "trl": importlib.metadata.version("trl")},
              "runs": runs,
              "sanity": sanity(args, rounds)}
    return report(args, result, rounds, ROWS, "completions")


if __name__ == "__main__":
    main()
