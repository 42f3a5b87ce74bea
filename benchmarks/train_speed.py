"""LoRA fine-tuning speed on one machine: Trainer + peft, TRL's SFTTrainer, and lorakit, side by side.

    python benchmarks/train_speed.py                       # default workload: SmolLM2-135M shape
    python benchmarks/train_speed.py --size smollm-dev --steps 6 --pipelines trainer lorakit-plain lorakit

Every pipeline trains the same randomly initialised model (built from a config), on the same
prompt/completion rows (64-256 tokens), with LoRA r=16 / alpha=32 on all seven projections,
the same learning rate, schedule and number of optimizer steps, about 8 examples per step, in
its own forked child process. Reported per pipeline: real (non-pad) tokens per second, target
tokens per second, peak RSS, final loss, ratios to the Trainer pipeline, and the model FLOP
rate as a fraction of this machine's bf16 matmul rate measured in the same run. See
benchmarks/RESULTS.md for measured numbers and benchmarks/README.md for the method.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_sft import environment, preload
from sft_workload import LORA, SIZES, describe

# pipeline name -> (runner, Job overrides); runners live in sft_paths / speed_paths
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "trainer": ("trainer", {"precision": "fp32"}),  # (a) the lecture: fp32, one example per row, padded
    "trl": ("trl", {"precision": "fp32"}),  # (b) SFTTrainer, BFD packing (padding-free rows)
    "lorakit-plain": ("lorakit", {"precision": "fp32"}),  # packing only
    "lorakit-bf16": ("lorakit", {"precision": "bf16"}),  # + bf16 base weights, fp32 adapters
    "lorakit-chunked": ("lorakit", {"precision": "bf16", "chunked_loss": True}),  # + chunked cross-entropy
    "lorakit-dense-mask": ("lorakit", {"precision": "bf16", "chunked_loss": True, "varlen": False}),  # - varlen
    "lorakit-one-row": ("lorakit", {"precision": "bf16", "chunked_loss": True, "one_row": True}),  # + 1 row/micro
    "lorakit": ("lorakit", {"precision": "bf16", "chunked_loss": True, "compile": True}),  # recommended on a CPU
    # the same with LoRA dropout through nn.Dropout (torch's mask, as peft) instead of lorakit's; for --lora-dropout > 0
    "lorakit-torch-dropout": ("lorakit", {"precision": "bf16", "chunked_loss": True, "compile": True,
                                          "torch_dropout": True}),
    # the config a user writes (no speed settings) through lorakit.finetune, every auto setting as it resolves here
    "lorakit-default": ("lorakit-default", {}),
    # the same as 2 DDP ranks (gloo) of 1 thread each instead of 1 process of 2 threads: `lorakit train --nproc 2`
    "lorakit-ddp2": ("lorakit", {"precision": "bf16", "chunked_loss": True, "compile": True, "ranks": 2}),
}
DEFAULT_PIPELINES = ("trainer", "trl", "lorakit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm")
    parser.add_argument("--pipelines", nargs="*", choices=sorted(VARIANTS), default=list(DEFAULT_PIPELINES),
                        help="training pipelines (none: only the generation part)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps run but not timed")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--user-rows", type=int, default=4000,
                        help="lorakit-default: rows of the user's dataset (one epoch of them is the run the auto "
                             "rules plan for; the clock stops it after --steps steps)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="peft's default; the same for all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="pipeline 'lorakit' compiles its decoder layers (--no-compile: eager; compiling "
                             "takes a minute or two of warmup on a small CPU)")
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure generation: peft + transformers generate vs lorakit (plain loop, unmerged, default), "
                             "and the multi-adapter batch vs peft's set_adapter loop (benchmarks/infer_paths.py)")
    parser.add_argument("--prompts", type=int, default=16, help="generation: prompts in the batch")
    parser.add_argument("--new-tokens", type=int, default=64, help="generation: new tokens per prompt")
    parser.add_argument("--generate-repeats", type=int, default=3,
                        help="generation: timed runs of each side (the median counts)")
    parser.add_argument("--multi-repeats", type=int, default=3,
                        help="generation: timed repeats of the multi-adapter comparison (0 skips it)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the pipelines this many times, interleaved (round k starts at pipeline k mod n, "
                             "so no pipeline always runs first); each round's ratios to the first pipeline are "
                             "reported, and the rounds that reach --goal")
    parser.add_argument("--goal", type=float, default=4.0,
                        help="with --rounds: the real tokens/s ratio to the first pipeline counted as met")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if not args.pipelines and not args.inference:
        parser.error("nothing to run: give --pipelines or keep --inference")
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 1")
    return args


def child_main(args: argparse.Namespace, pipeline: str, out: Path) -> None:
    """Build the job, run one pipeline, write its measurements and model FLOPs as JSON."""
    ranks = VARIANTS[pipeline][1].get("ranks", 1)
    if ranks > 1:
        ranks_main(args, pipeline, ranks, out)
    else:
        train_one(args, pipeline, args.threads, out)


def ranks_main(args: argparse.Namespace, pipeline: str, ranks: int, out: Path) -> None:
    """Run one pipeline as `ranks` DDP processes (forked, torch.distributed env as torchrun sets
    it), the machine's threads split between them; rank 0's measurements, with the CPU time and
    peak RSS of all ranks summed (what the whole job costs)."""
    threads = max(1, (args.threads or os.cpu_count() or 1) // ranks)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks)}
    with tempfile.TemporaryDirectory(prefix="train-speed-ranks-") as scratch:
        context = multiprocessing.get_context("fork")
        children = []
        for rank in range(ranks):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            child = context.Process(target=_rank_main, args=(env, args, pipeline, threads, Path(scratch) / f"{rank}.json"),
                                    name=f"speed-{pipeline}-rank{rank}")
            child.start()
            children.append(child)
        for child in children:
            child.join()
        failed = [c.name for c in children if c.exitcode != 0]
        if failed:
            raise SystemExit(f"{', '.join(failed)} failed (traceback above)")
        results = [json.loads((Path(scratch) / f"{rank}.json").read_text()) for rank in range(ranks)]
    main_rank = results[0]
    cpu = sum(r["cpu_seconds"] for r in results)
    out.write_text(json.dumps({**main_rank, "cpu_seconds": cpu, "tokens_per_cpu_s": main_rank["target_tokens"] / cpu,
                               "peak_mb": sum(r["peak_mb"] for r in results),
                               "rank_peak_mb": [r["peak_mb"] for r in results],
                               "rank_cpu_seconds": [r["cpu_seconds"] for r in results]}))


def _rank_main(env: dict[str, str], args: argparse.Namespace, pipeline: str, threads: int, out: Path) -> None:
    os.environ.update(env)
    from lorakit.train import distributed

    try:
        train_one(args, pipeline, threads, out)
    finally:
        distributed.shutdown()


def train_one(args: argparse.Namespace, pipeline: str, threads: int, out: Path) -> None:
    """One process of a pipeline (the whole of it, or one DDP rank): its measurements as JSON."""
    import torch

    from sft_paths import PIPELINES, Job, run_pipeline, tutorial_tokenize
    from sft_workload import build_model, make_tokenizer, workload_rows
    from speed_paths import mean_causal_context, model_flops_per_token, run_trl

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    PIPELINES.setdefault("trl", run_trl)
    size = SIZES[args.size]
    tokenizer = make_tokenizer(size, args.seed)
    rows = workload_rows(args.steps * size.micro_batch * size.grad_accum, size, tokenizer, args.seed)
    model = build_model(size, args.seed, tokenizer)
    lengths = [len(tutorial_tokenize(tokenizer)(r)["input_ids"]) for r in rows]
    flops = model_flops_per_token(model, LORA["targets"], LORA["r"], mean_causal_context(lengths))
    runner, overrides = VARIANTS[pipeline]
    if overrides.get("compile") and not args.compile:
        overrides = {**overrides, "compile": False}
    user_rows = workload_rows(args.user_rows, size, tokenizer, args.seed) if runner == "lorakit-default" else None
    job = Job(size=size, model=model, tokenizer=tokenizer, rows=rows, steps=args.steps, warmup=args.warmup,
              lr=args.lr, seed=args.seed, device="cpu", precision="fp32", lora_dropout=args.lora_dropout,
              user_rows=user_rows)
    result = run_pipeline(runner, replace(job, **overrides))
    out.write_text(json.dumps({**result, "pipeline": pipeline, "flops_per_token": flops,
                               "threads": torch.get_num_threads(), "gpu": "none", **overrides}))


def run_child(args: argparse.Namespace, pipeline: str) -> dict[str, Any]:
    """One pipeline in a forked child (its own memory peak); returns its measurements."""
    return _in_child(child_main, (args, pipeline), f"speed-{pipeline}")


def matmul_child(args: argparse.Namespace, out: Path) -> None:
    """The bf16 matmul peak, measured in a child like the runs (same threads)."""
    import torch

    from speed_paths import bf16_matmul_rate

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    out.write_text(json.dumps(bf16_matmul_rate(size.hidden, size.intermediate)))


def _in_child(target: Any, args: tuple[Any, ...], name: str) -> dict[str, Any]:
    """Run target(*args, out) in a forked child and return the JSON it wrote to out.

    The parent runs no torch work itself: a fork after torch's OpenMP pool has started (any
    op with more than one thread) can leave the child waiting forever on the pool's lock.
    """
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="train-speed-") as scratch:
        out = Path(scratch) / "result.json"
        child = context.Process(target=target, args=(*args, out), name=name)
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the {name} child failed with exit code {child.exitcode} (traceback above)")
        return json.loads(out.read_text())


def derived(run: dict[str, Any], warmup: int, roofline: dict[str, float]) -> dict[str, float]:
    """Real-token rates and the model FLOP rate as a share of the bf16 matmul rate."""
    real = sum(run["step_real_tokens"][warmup:])
    per_cpu_s = real / run["cpu_seconds"]
    return {"real_tokens": real, "real_tokens_per_s": real / run["train_seconds"], "real_tokens_per_cpu_s": per_cpu_s,
            "model_flops_per_cpu_s": per_cpu_s * run["flops_per_token"],
            "roofline_fraction": per_cpu_s * run["flops_per_token"] / roofline["flops_per_cpu_s"]}


def table(result: dict[str, Any]) -> str:
    """Pipelines side by side, with ratios to the first (the Trainer pipeline)."""
    runs = result["runs"]
    base = runs[0]
    rows = [("real tokens/s (wall)", "real_tokens_per_s", "{:.0f}", True),
            ("real tokens/CPU-s", "real_tokens_per_cpu_s", "{:.0f}", True),
            ("target tokens/CPU-s", "tokens_per_cpu_s", "{:.0f}", True),
            ("peak RSS MiB", "peak_mb", "{:.0f}", True),
            ("padding fraction", "padding_fraction", "{:.1%}", False),
            ("first loss", "first_loss", "{:.3f}", False),
            ("final loss (last 3)", "final_loss", "{:.3f}", False),
            ("bf16 roofline share", "roofline_fraction", "{:.1%}", False),
            ("s to end of step 1", "seconds_to_first_step", "{:.1f}", False)]
    width = max(16, *(len(r["pipeline"]) + 2 for r in runs))
    lines = [f"{'':24}" + "".join(f"{r['pipeline']:>{width}}" for r in runs)]
    for label, key, fmt, with_ratio in rows:
        cells = "".join(f"{fmt.format(r[key]) if key in r else '-':>{width}}" for r in runs)
        lines.append(f"{label:24}{cells}")
        if with_ratio:
            ratios = "".join(f"{r[key] / base[key]:>{width - 1}.2f}x" for r in runs)
            lines.append(f"{'  vs ' + base['pipeline']:24}{ratios}")
    roof = result["roofline"]
    lines.append(f"bf16 matmul peak: {roof['flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-second "
                 f"({roof['flops_per_s'] / 1e9:.0f} GFLOP/s wall, {roof['threads']} threads; the best of "
                 f"{len(roof.get('samples', [roof])) * roof.get('windows', 1)} timed windows before and after "
                 f"the runs; that measurement's median window "
                 f"{roof.get('median_flops_per_cpu_s', roof['flops_per_cpu_s']) / 1e9:.0f})")
    return "\n".join(lines)


def round_ratios(rounds: list[list[dict[str, Any]]], goal: float) -> dict[str, dict[str, Any]]:
    """Per pipeline after the first: its real tokens/s (wall) over the first pipeline's, round by round, and how
    many rounds reach `goal`."""
    ratios = {}
    for k, pipeline in enumerate(run["pipeline"] for run in rounds[0][1:]):
        values = [runs[k + 1]["real_tokens_per_s"] / runs[0]["real_tokens_per_s"] for runs in rounds]
        ratios[pipeline] = {"ratios": values, "min": min(values), "median": sorted(values)[len(values) // 2],
                            "rounds_met": sum(value >= goal for value in values), "rounds": len(values)}
    return ratios


def round_table(ratios: dict[str, dict[str, Any]], goal: float) -> str:
    """One line per pipeline: its ratio in every round and the rounds that reach the goal."""
    lines = [f"real tokens/s (wall) over the first pipeline, round by round (goal {goal:g}x):"]
    for pipeline, found in ratios.items():
        values = " ".join(f"{value:.2f}x" for value in found["ratios"])
        lines.append(f"  {pipeline:24} {values}   min {found['min']:.2f}x, {found['rounds_met']} of "
                     f"{found['rounds']} rounds >= {goal:g}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preload()
    import torch

    from sft_paths import interleaved_rounds
    from speed_paths import best_rate

    rounds: list[list[dict[str, Any]]] = []
    rates = []
    if args.pipelines:  # the matmul peak, before and after the runs; the best counts
        rates.append(_in_child(matmul_child, (args,), "speed-matmul"))
    rounds += interleaved_rounds(args.pipelines, args.rounds, lambda pipeline: run_child(args, pipeline))
    result = {"benchmark": "lora-sft training speed: Trainer+peft, TRL SFTTrainer, lorakit; generation speed",
              "command": " ".join(["python", "benchmarks/train_speed.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"steps": args.steps, "warmup": args.warmup, "lr": args.lr, "lora_dropout": args.lora_dropout,
                           "seed": args.seed, "compile": args.compile, "user_rows": args.user_rows,
                           "threads": args.threads, "rounds": args.rounds, **describe(args.size),
                           "lora": {**LORA, "dropout": args.lora_dropout}},
              "environment": {"torch": torch.__version__, **_versions("transformers", "peft", "trl")}}
    if rounds:
        rates.append(_in_child(matmul_child, (args,), "speed-matmul"))
        roofline = best_rate(rates)
        rounds = [[{**run, **derived(run, args.warmup, roofline)} for run in runs] for runs in rounds]
        runs = rounds[0]
        result.update(environment={**environment(runs), "trl": _version("trl")}, roofline=roofline, runs=runs,
                      sanity={"same_examples": all(len({r["examples_digest"] for r in runs
                                                        if r["pipeline"] != "lorakit-default"}) <= 1
                                                   for runs in rounds)})
        for index, runs in enumerate(rounds):
            if args.rounds > 1:
                print(f"round {index + 1} of {args.rounds}")
            print(table({**result, "runs": runs}))
        if args.rounds > 1:
            result["rounds"] = rounds
            result["round_ratios"] = round_ratios(rounds, args.goal)
            print(round_table(result["round_ratios"], args.goal))
    if args.inference:
        from infer_paths import measure
        from infer_paths import table as inference_table

        print("generation ...", file=sys.stderr, flush=True)
        result["inference"] = measure(args.size, args.seed, args.threads, args.prompts, args.new_tokens,
                                      args.generate_repeats, args.multi_repeats)
        print(inference_table(result["inference"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _versions(*names: str) -> dict[str, str]:
    return {name: _version(name) for name in names}


if __name__ == "__main__":
    main()
