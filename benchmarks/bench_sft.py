"""LoRA SFT, side by side: the Trainer + peft tutorial pipeline against lorakit.

    python benchmarks/bench_sft.py --device cpu --size small --steps 12 --repeats 3 --out results.json

Each pipeline runs in its own child process (so peak memory is its own), on the same base model,
rows, LoRA recipe, learning rate, schedule, effective batch and number of optimizer steps. The
order alternates between repeats; the table and JSON report medians over repeats and the ratios
lorakit / trainer. See benchmarks/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sft_workload import SIZES, describe

PIPELINE_NAMES = ("trainer", "lorakit")
PRECISIONS = ("fp32", "bf16-autocast", "bf16")
MEDIAN_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "step_seconds", "peak_mb", "peak_delta_mb", "final_loss", "first_loss",
               "padding_fraction")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps run but not timed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pipeline; medians are reported")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="fp32 (default on cpu), bf16-autocast, or bf16 base weights (default on cuda)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per child; 0 = torch's default")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 0")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    return args


# ----------------------------------------------------------------------------- child


def preload() -> None:
    """Import both pipelines' libraries once, before any child is forked.

    Forked children then start in milliseconds instead of re-importing torch, transformers,
    peft and datasets (about 10 s each on a small CPU), and both start from the same resident
    memory. Nothing here may start threads or touch a device: that would not survive fork.
    """
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import lorakit.adapters  # noqa: F401
    import lorakit.train.loop  # noqa: F401


def child_main(args: argparse.Namespace, pipeline: str, out: Path) -> None:
    """Build the job, run one pipeline, write its measurements as JSON (runs in the child)."""
    import torch

    from sft_paths import Job, run_pipeline
    from sft_workload import build_model, make_tokenizer, workload_rows

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' own deprecation notices
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    size = SIZES[args.size]
    tokenizer = make_tokenizer(size, args.seed)
    rows = workload_rows(args.steps * size.micro_batch * size.grad_accum, size, tokenizer, args.seed)
    job = Job(size=size, model=build_model(size, args.seed, tokenizer), tokenizer=tokenizer, rows=rows,
              steps=args.steps, warmup=args.warmup, lr=args.lr, seed=args.seed, device=args.device,
              precision=args.precision)
    result = run_pipeline(pipeline, job)
    result["threads"] = torch.get_num_threads()
    result["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else "none"
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent


def start_method(device: str) -> str:
    """fork on the CPU (children inherit the preloaded imports); spawn for CUDA (CUDA cannot fork)."""
    return "spawn" if device == "cuda" else "fork"


def run_child(args: argparse.Namespace, pipeline: str) -> dict[str, Any]:
    """Run one pipeline in a child process and return its measurements."""
    context = multiprocessing.get_context(start_method(args.device))
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as scratch:
        out = Path(scratch) / "result.json"
        child = context.Process(target=child_main, args=(args, pipeline, out), name=f"bench-{pipeline}")
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the {pipeline} child failed with exit code {child.exitcode} (traceback above)")
        return json.loads(out.read_text())


def schedule(repeats: int) -> list[tuple[int, str]]:
    """(repeat, pipeline) in run order; the order alternates so neither always goes first."""
    runs = []
    for repeat in range(repeats):
        order = PIPELINE_NAMES if repeat % 2 == 0 else PIPELINE_NAMES[::-1]
        runs += [(repeat, name) for name in order]
    return runs


def medians(runs: list[dict[str, Any]], pipeline: str) -> dict[str, float]:
    mine = [r for r in runs if r["pipeline"] == pipeline]
    return {key: statistics.median(r[key] for r in mine) for key in MEDIAN_KEYS}


def summarise_runs(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON result: settings, every run, medians, ratios lorakit / trainer, sanity checks."""
    summary = {name: medians(runs, name) for name in PIPELINE_NAMES}
    trainer, lorakit = summary["trainer"], summary["lorakit"]
    digests = {r["examples_digest"] for r in runs}
    return {
        "benchmark": "lora-sft: transformers.Trainer + peft vs lorakit",
        "settings": {"device": args.device, "precision": args.precision, "steps": args.steps,
                     "warmup": args.warmup, "repeats": args.repeats, "lr": args.lr, "seed": args.seed,
                     "threads": runs[0]["threads"], **describe(args.size)},
        "environment": environment(runs),
        "runs": runs,
        "summary": summary,
        "ratios": {"tokens_per_s": lorakit["tokens_per_s"] / trainer["tokens_per_s"],
                   "tokens_per_cpu_s": lorakit["tokens_per_cpu_s"] / trainer["tokens_per_cpu_s"],
                   "step_seconds": lorakit["step_seconds"] / trainer["step_seconds"],
                   "peak_memory": lorakit["peak_mb"] / trainer["peak_mb"],
                   "peak_memory_delta": lorakit["peak_delta_mb"] / trainer["peak_delta_mb"]},
        "sanity": {"same_examples": len(digests) == 1,
                   "loss_falls": {name: summary[name]["final_loss"] < summary[name]["first_loss"]
                                  for name in PIPELINE_NAMES}},
    }


def environment(runs: list[dict[str, Any]]) -> dict[str, str]:
    """Versions and hardware the numbers were measured with."""
    libraries = {name: version(name) for name in ("torch", "transformers", "peft", "lorakit")}
    return {"python": platform.python_version(), **libraries, "machine": platform.machine(),
            "cpus": str(os.cpu_count()), "gpu": runs[0]["gpu"], **cpu_description()}


# the CPU flags that decide the speed of this workload: bf16 matrix units, AVX-512, AVX2
MATMUL_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_description() -> dict[str, str]:
    """The CPU's model name, its family for the goals (AMX / AVX512-BF16 / other) and its matmul-relevant flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {"cpu_model": platform.processor() or "unknown", "cpu_family": "unknown", "cpu_flags": ""}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    family = "amx" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags else "no native bf16"
    return {"cpu_model": fields.get("model name", "unknown"), "cpu_family": family,
            "cpu_flags": " ".join(flag for flag in MATMUL_FLAGS if flag in flags)}


def table(result: dict[str, Any]) -> str:
    """A plain-text table of the medians and ratios."""
    s, r = result["summary"], result["ratios"]
    lines = [f"{'':24}{'trainer+peft':>14}{'lorakit':>14}{'lorakit/trainer':>18}"]
    rows = [("target tokens/s", "tokens_per_s", "{:.0f}", r["tokens_per_s"]),
            ("target tokens/CPU-s", "tokens_per_cpu_s", "{:.0f}", r["tokens_per_cpu_s"]),
            ("seconds / step", "step_seconds", "{:.3f}", r["step_seconds"]),
            ("peak memory MiB", "peak_mb", "{:.0f}", r["peak_memory"]),
            ("  of which training", "peak_delta_mb", "{:.0f}", r["peak_memory_delta"]),
            ("padding fraction", "padding_fraction", "{:.1%}", None),
            ("first loss", "first_loss", "{:.3f}", None),
            ("final loss", "final_loss", "{:.3f}", None)]
    for label, key, fmt, ratio in rows:
        ratio_text = f"{ratio:>17.2f}x" if ratio is not None else ""
        lines.append(f"{label:24}{fmt.format(s['trainer'][key]):>14}{fmt.format(s['lorakit'][key]):>14}{ratio_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cpu":
        preload()
    runs = []
    for repeat, pipeline in schedule(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}: {pipeline} ...", file=sys.stderr, flush=True)
        runs.append({**run_child(args, pipeline), "repeat": repeat})
    result = summarise_runs(args, runs)
    result["command"] = " ".join(["python", "benchmarks/bench_sft.py", *(argv if argv is not None else sys.argv[1:])])
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
