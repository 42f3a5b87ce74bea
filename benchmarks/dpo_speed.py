"""DPO speed with LoRA: TRL's DPOTrainer against lorakit, side by side, on one machine (issue 20, item 7).

    python benchmarks/dpo_speed.py                                    # SmolLM2-135M shape: trl, lorakit
    python benchmarks/dpo_speed.py --size smollm-dev --rounds 3 --pipelines trl lorakit lorakit-padded

Both sides train the same randomly initialised model (sft_workload.build_model, saved to a folder
that each side loads itself), on the same preference rows, with LoRA r=16 / alpha=32 / dropout 0
on all seven projections, DPO's sigmoid loss with beta 0.1, the same learning rate (linear decay
over one epoch of the rows, no warmup), clipping at 1.0, no weight decay and the same pairs per
optimizer step; the reference is the model with its adapter switched off on both sides. Each
pipeline runs in its own forked child; the step clock of the SFT benchmark (sft_paths.StepClock)
reads the clocks after every optimizer step and stops the run after --steps of them, the first
--warmup untimed.

    trl             trl.DPOTrainer(model=FOLDER, peft_config=LoraConfig(...)) with DPOConfig's defaults
                    except the shared settings above. TRL's docs default DPOConfig to bf16 mixed precision
                    (fp32 weights, bf16 autocast) and gradient checkpointing on, so that is what runs.
    trl-no-gc       the same with gradient_checkpointing=False (what a user without memory pressure sets)
    lorakit         lorakit.finetune with the config a user writes (no speed settings): every auto setting
                    (precision, compile, the pair layout) as it resolves on this machine
    lorakit-padded  the same with data.packing: false (padded pairs, whatever the probe says)

The rows: each SFT workload row (sft_workload.workload_rows: the completion reverses the prompt's
words) gives one pair: chosen = its completion, rejected = as many of the prompt's words in their own
order (a wrong answer of about the same length); both sides fit the size's max_length.
Reported per pipeline: pairs per second (wall and per CPU-second), trained (answer) tokens per
second, peak RSS, first and last loss, ratios to the first pipeline, and per round (--rounds) the
ratio of pairs/s to the first pipeline and the rounds that reach --goal. The losses are a record that
both sides optimise the same thing (a fresh adapter is its own reference: log 2 at the first step, up
to bf16 rounding), not a learning curve: a few steps on random weights do not move DPO's loss reliably.
`sanity.same_pairs` checks that both sides trained the very same token ids and trained positions.
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
from sft_paths import IGNORE_INDEX, Job, MemoryMeter, StepClock, _Enough, interleaved_rounds, loss_logger, summarise
from sft_workload import LORA, PROMPT_TEMPLATE, SIZES, describe, example_length, workload_rows
from train_speed import _in_child

TRL_PIPELINES = {"trl": {}, "trl-no-gc": {"gradient_checkpointing": False}}  # DPOConfig settings beyond the shared
LORAKIT_PIPELINES = {"lorakit": {}, "lorakit-padded": {"packing": False}}  # data settings beyond the user's config
PIPELINES = (*TRL_PIPELINES, *LORAKIT_PIPELINES)
DEFAULT_PIPELINES = ("trl", "lorakit")
AUTO_LINES = ("precision:", "compile:", "pair layout:")  # the lines of lorakit's auto settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(DEFAULT_PIPELINES),
                        help="the first is the one the ratios are taken to")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps run but not timed")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step (one micro-batch)")
    parser.add_argument("--rows", type=int, default=2000,
                        help="rows of the dataset both sides are given (one epoch of them is the run the lr "
                             "schedule and lorakit's auto rules plan for; the clock stops it after --steps)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per child; 0 = torch's default")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the pipelines this many times, interleaved (round k starts at pipeline k mod n)")
    parser.add_argument("--goal", type=float, default=2.0, help="pairs/s ratio to the first pipeline counted as met")
    parser.add_argument("--lorakit-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides for the lorakit pipelines (e.g. train.compile=false), to "
                             "measure one auto setting against its alternative; none by default")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 1")
    if args.rounds < 1 or args.pairs < 1:
        parser.error("--rounds and --pairs must be at least 1")
    if any("=" not in item for item in args.lorakit_set):
        parser.error("--lorakit-set takes KEY=VALUE items")
    if args.rows < args.steps * args.pairs:
        parser.error(f"--rows ({args.rows}) must hold --steps x --pairs ({args.steps * args.pairs}) pairs")
    return args


# ----------------------------------------------------------------------------- the workload


def preference_rows(n_rows: int, size_name: str, tokenizer: Any, seed: int) -> list[dict[str, str]]:
    """`n_rows` prompt/chosen/rejected rows (see the module docstring), both sides within the size's lengths."""
    size = SIZES[size_name]
    rows = []
    for row in workload_rows(2 * n_rows, size, tokenizer, seed):
        words = row["prompt"].split(": ", 1)[1].split()
        rejected = " ".join(words[:len(row["completion"].split())]) + "."
        if example_length({"prompt": row["prompt"], "completion": rejected}, tokenizer) <= size.max_length:
            rows.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
        if len(rows) == n_rows:
            return rows
    raise RuntimeError(f"only {len(rows)} of {n_rows} pairs fit max_length={size.max_length}")


def pairs_digest(sides: list[tuple[list[int], list[bool]]]) -> str:
    """A short hash of every side's token ids and trained positions, pair by pair (chosen, rejected)."""
    payload = json.dumps([[ids, [int(t) for t in trained]] for ids, trained in sides], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def setup_child(args: argparse.Namespace, workdir: Path) -> tuple[Any, list[dict[str, str]], Path]:
    """(tokenizer, rows, model folder): the job both sides build identically; the model is saved and dropped, so
    each side loads it itself, inside its measured memory."""
    import torch

    from sft_workload import build_model, make_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    tokenizer = make_tokenizer(size, args.seed)
    rows = preference_rows(args.rows, args.size, tokenizer, args.seed)
    model_dir = workdir / "base-model"
    model = build_model(size, args.seed, tokenizer)
    model.config.use_cache = False
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    return tokenizer, rows, model_dir


def timed_job(args: argparse.Namespace) -> Job:
    """The sft_paths Job `summarise` reads (steps and warmup)."""
    return Job(size=SIZES[args.size], model=None, tokenizer=None, rows=[], steps=args.steps, warmup=args.warmup,
               lr=args.lr, seed=args.seed, device="cpu", precision="")


def measured(args: argparse.Namespace, clock: StepClock, step_tokens: list[int], step_pairs: list[int],
             losses: list[float], meter: MemoryMeter, started: float) -> dict[str, Any]:
    """The steady-state figures of a run the clock stopped after --steps steps."""
    clock.wall, clock.cpu = clock.wall[:args.steps], clock.cpu[:args.steps]
    result = summarise(timed_job(args), clock, step_tokens[:args.steps], losses[:args.steps])
    pairs = sum(step_pairs[args.warmup:args.steps])
    peak = meter.peak_mb()
    return {**result, "pairs": pairs, "pairs_per_s": pairs / result["train_seconds"],
            "pairs_per_cpu_s": pairs / result["cpu_seconds"], "step_pairs": step_pairs[:args.steps],
            "peak_mb": peak, "baseline_mb": meter.baseline_mb, "peak_delta_mb": peak - meter.baseline_mb,
            "seconds_to_first_step": clock.wall[0] - started}


# ----------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace, pipeline: str, out: Path) -> None:
    """TRL's DPOTrainer as its docs show it: a model folder, a peft LoraConfig, DPOConfig (child process)."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="dpo-speed-trl-") as scratch:
        workdir = Path(scratch)
        tokenizer, rows, model_dir = setup_child(args, workdir)
        dataset = Dataset.from_list([{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"],
                                      "rejected": r["rejected"]} for r in rows])
        losses: list[float] = []
        seen: list[dict[str, int]] = []

        config = DPOConfig(
            output_dir=str(workdir / "trl"), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
            learning_rate=args.lr, num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=SIZES[args.size].max_length,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed, use_cpu=True,
            **TRL_PIPELINES[pipeline])
        meter = MemoryMeter("cpu")
        meter.start()
        started = time.perf_counter()
        trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                    target_modules=LORA["targets"], task_type="CAUSAL_LM"),
                             callbacks=[loss_logger(losses)])
        trainer.remove_callback(PrinterCallback)
        collate = trainer.data_collator

        def counting_collator(features: list[dict]) -> dict:
            batch = collate(features)
            seen.append({"pairs": len(features), "targets": int(batch["completion_mask"].sum())})
            return batch

        trainer.data_collator = counting_collator
        with StepClock("cpu") as clock:
            clock.stop_after = args.steps + 1  # the (steps + 1)th tick ends the run: `steps` steps are recorded
            try:
                trainer.train()
            except _Enough:
                pass
        result = measured(args, clock, [s["targets"] for s in seen], [s["pairs"] for s in seen], losses, meter,
                          started)
        data = trainer.train_dataset
        sides = [(p + side, [False] * len(p) + [True] * len(side))
                 for p, chosen, rejected in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
                 for side in (chosen, rejected)]
        out.write_text(json.dumps({**result, "pipeline": pipeline, "precision": "bf16 autocast" if config.bf16 else
                                   "fp32", "gradient_checkpointing": config.gradient_checkpointing,
                                   "pairs_digest": pairs_digest(sides), "threads": torch.get_num_threads(),
                                   "gpu": "none"}))


# ----------------------------------------------------------------------------- lorakit


def user_config(args: argparse.Namespace, model_dir: Path, data_file: Path, out_dir: Path) -> dict[str, Any]:
    """The config a user writes for this job: model, data, LoRA recipe, objective, optimizer; no speed settings."""
    return {"model": {"name_or_path": str(model_dir)},
            "data": {"source": str(data_file), "prompt_template": PROMPT_TEMPLATE,
                     "max_length": SIZES[args.size].max_length},
            "method": {"name": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": 0.0,
                       "targets": LORA["targets"]},
            "train": {"objective": "dpo", "beta": args.beta, "lr": args.lr, "epochs": 1,
                      "micro_batch_size": args.pairs, "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0,
                      "max_grad_norm": 1.0, "seed": args.seed, "progress": "none"},
            "output_dir": str(out_dir), "name": "run"}


def overrides(items: list[str]) -> dict[str, Any]:
    """--lorakit-set's KEY=VALUE items as finetune's overrides (values read as YAML, as on the command line)."""
    import yaml

    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}


def user_run(args: argparse.Namespace, config_of: Any, pipeline_data: dict[str, Any], workdir: Path, rows: list,
             model_dir: Path, data_name: str, stop_after: int = 0) -> dict[str, Any]:
    """`lorakit.finetune` on the config a user writes (`config_of(args, model_dir, data_file, runs)`, plus the
    pipeline's data settings) over `rows` written to `data_name`, under the step clock (`stop_after` > 0 ends the
    run at that tick) and the memory meter: {config, lines (what it printed), clock, meter, started, records}."""
    from lorakit.run import finetune
    from lorakit.train import read_metrics

    data_file = workdir / data_name
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = config_of(args, model_dir, data_file, workdir / "runs")
    config["data"].update(pipeline_data)
    lines: list[str] = []
    meter = MemoryMeter("cpu")
    meter.start()
    started = time.perf_counter()
    with StepClock("cpu") as clock:
        clock.stop_after = stop_after
        try:
            finetune(config, overrides=overrides(args.lorakit_set), log=lines.append)
        except _Enough:
            pass
    return {"config": config, "lines": lines, "clock": clock, "meter": meter, "started": started,
            "records": read_metrics(workdir / "runs" / "run" / "metrics.jsonl")}


def run_lorakit(args: argparse.Namespace, pipeline: str, out: Path) -> None:
    """lorakit as a user runs it: `lorakit.finetune(user_config)` (what `lorakit train CONFIG` runs) (child process)."""
    import torch

    from lorakit.data import DataConfig
    from lorakit.data.preference import tokenize_preference_rows

    with tempfile.TemporaryDirectory(prefix="dpo-speed-lorakit-") as scratch:
        workdir = Path(scratch)
        tokenizer, rows, model_dir = setup_child(args, workdir)
        # the (steps + 1)th tick ends the run: `steps` steps are recorded
        run = user_run(args, user_config, LORAKIT_PIPELINES[pipeline], workdir, rows, model_dir, "pairs.jsonl",
                       stop_after=args.steps + 1)
        config, lines, clock, meter, started = (run[key] for key in ("config", "lines", "clock", "meter", "started"))
        records = run["records"][:args.steps]
        if len(records) < args.steps:
            raise RuntimeError(f"the run ended after {len(records)} of {args.steps} steps:\n" + "\n".join(lines))
        cumulative = [0] + [r["trained_tokens"] for r in records]
        step_tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
        result = measured(args, clock, step_tokens, [args.pairs] * args.steps, [r["loss"] for r in records], meter,
                          started)
        pairs, _ = tokenize_preference_rows(rows, tokenizer, DataConfig(**{key: config["data"][key] for key in (
            "prompt_template", "max_length")}))
        sides = [(pair[name]["input_ids"], [label != IGNORE_INDEX for label in pair[name]["labels"]])
                 for pair in pairs for name in ("chosen", "rejected")]
        out.write_text(json.dumps({**result, "pipeline": pipeline, "auto_choices": [
            line for line in lines if line.startswith(AUTO_LINES)], "pairs_digest": pairs_digest(sides),
            "threads": torch.get_num_threads(), "gpu": "none"}))


# ----------------------------------------------------------------------------- the parent


def run_child(args: argparse.Namespace, pipeline: str) -> dict[str, Any]:
    """One pipeline in a forked child (its own memory peak); returns its measurements."""
    target = run_trl if pipeline in TRL_PIPELINES else run_lorakit
    return _in_child(target, (args, pipeline), f"dpo-{pipeline}")


ROWS = [("pairs/s (wall)", "pairs_per_s", "{:.3f}", True), ("pairs/CPU-s", "pairs_per_cpu_s", "{:.3f}", True),
        ("answer tokens/s (wall)", "tokens_per_s", "{:.1f}", True),
        ("answer tokens/CPU-s", "tokens_per_cpu_s", "{:.1f}", True), ("peak RSS MiB", "peak_mb", "{:.0f}", True),
        ("first loss", "first_loss", "{:.4f}", False), ("final loss (last 3)", "final_loss", "{:.4f}", False),
        ("s to end of step 1", "seconds_to_first_step", "{:.1f}", False)]


def table(runs: list[dict[str, Any]], rows: list[tuple[str, str, str, bool]] = ROWS) -> str:
    """Pipelines side by side, with ratios to the first; `rows`: (label, key, format, with a ratio) per line."""
    base, width = runs[0], max(16, *(len(r["pipeline"]) + 2 for r in runs))
    lines = [f"{'':24}" + "".join(f"{r['pipeline']:>{width}}" for r in runs)]
    for label, key, fmt, with_ratio in rows:
        lines.append(f"{label:24}" + "".join(f"{fmt.format(r[key]):>{width}}" for r in runs))
        if with_ratio:
            lines.append(f"{'  vs ' + base['pipeline']:24}" + "".join(f"{r[key] / base[key]:>{width - 1}.2f}x"
                                                                       for r in runs))
    return "\n".join(lines)


def round_ratios(rounds: list[list[dict[str, Any]]], goal: float, unit: str = "pairs") -> dict[str, dict[str, Any]]:
    """Per pipeline after the first: its `unit`/s (wall and per CPU-second: the runs' `unit`_per_s and
    `unit`_per_cpu_s) over the first pipeline's, round by round, and how many rounds reach `goal` (wall)."""
    found = {}
    for k, pipeline in enumerate(run["pipeline"] for run in rounds[0][1:]):
        wall = [runs[k + 1][f"{unit}_per_s"] / runs[0][f"{unit}_per_s"] for runs in rounds]
        cpu = [runs[k + 1][f"{unit}_per_cpu_s"] / runs[0][f"{unit}_per_cpu_s"] for runs in rounds]
        found[pipeline] = {"ratios": wall, "cpu_ratios": cpu, "min": min(wall), "median": sorted(wall)[len(wall) // 2],
                           "rounds_met": sum(value >= goal for value in wall), "rounds": len(wall)}
    return found


def round_table(ratios: dict[str, dict[str, Any]], goal: float, base: str, unit: str = "pairs") -> str:
    """One line per pipeline: its `unit`/s ratio in every round and the rounds that reach the goal."""
    lines = [f"{unit}/s over {base}, round by round (wall; per CPU-second in brackets; goal {goal:g}x):"]
    for pipeline, found in ratios.items():
        values = " ".join(f"{w:.2f}x ({c:.2f}x)" for w, c in zip(found["ratios"], found["cpu_ratios"]))
        lines.append(f"  {pipeline:16} {values}   min {found['min']:.2f}x, {found['rounds_met']} of "
                     f"{found['rounds']} rounds >= {goal:g}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preload()  # bench_sft's imports, then TRL's and lorakit's entry point: once, before any child is forked
    for name in ("trl", "lorakit.run"):
        importlib.import_module(name)
    rounds = interleaved_rounds(args.pipelines, args.rounds, lambda pipeline: run_child(args, pipeline))
    runs = rounds[0]
    result = {"benchmark": "lora-dpo training speed: TRL DPOTrainer vs lorakit",
              "command": " ".join(["python", "benchmarks/dpo_speed.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"steps": args.steps, "warmup": args.warmup, "pairs_per_step": args.pairs, "rows": args.rows,
                           "lr": args.lr, "beta": args.beta, "loss": "sigmoid", "seed": args.seed,
                           "threads": args.threads, "rounds": args.rounds, "lorakit_set": args.lorakit_set,
                           **describe(args.size),
                           "lora": {**LORA, "dropout": 0.0}},
              "environment": {**environment(runs), "trl": importlib.metadata.version("trl")},
              "runs": runs,
              "sanity": {"same_pairs": all(len({r["pairs_digest"] for r in runs}) == 1 for runs in rounds)}}
    return report(args, result, rounds)


def report(args: argparse.Namespace, result: dict[str, Any], rounds: list[list[dict[str, Any]]],
           rows: list[tuple[str, str, str, bool]] = ROWS, unit: str = "pairs") -> dict[str, Any]:
    """Print each round's table, the per-round ratios to the first pipeline and `result`'s sanity checks, add the
    ratios and rounds to `result`, write it to --out; `unit`: what the rates count."""
    for index, runs_of_round in enumerate(rounds):
        if args.rounds > 1:
            print(f"round {index + 1} of {args.rounds}")
        print(table(runs_of_round, rows))
    if len(args.pipelines) > 1:
        result["round_ratios"] = round_ratios(rounds, args.goal, unit)
        print(round_table(result["round_ratios"], args.goal, args.pipelines[0], unit))
    print("sanity: " + ", ".join(f"{key} {value}" for key, value in result["sanity"].items()))
    if args.rounds > 1:
        result["rounds"] = rounds
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
