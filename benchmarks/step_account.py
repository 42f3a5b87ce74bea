"""Where a lorakit training step goes, against the bf16 roofline: the account behind the roofline share.

    python benchmarks/step_account.py --size smollm --threads 1 --out benchmarks/results/step-account.json

One lorakit run of the train_speed workload with the fastest settings (bf16 base weights, fp32 LoRA
weights, packed rows with per-example attention, the chunked loss, compiled decoder layers;
LoRA dropout 0), in this process. The steps after `--warmup` (compiling done) run under
torch.profiler with input shapes; their self CPU time is sorted into:

  base matmuls         the frozen projections (forward and input gradient): the work the roofline counts
  LoRA products        matmuls with a dimension equal to the rank: thin, memory-bound
  head + loss          matmuls with the vocabulary as a dimension, and the chunked cross-entropy
  attention            scaled-dot-product attention, forward and backward (per example, fp32 on a CPU)
  compiled kernels     inductor's fused elementwise code (norms, rotary, SiLU, residual adds, casts)
  eager elementwise    the same work where it runs op by op (outside the compiled layers, or --no-compile)
  copies and casts     aten copies, dtype conversions, contiguous/clone outside the compiled code
  optimizer            fused AdamW and the foreach ops around it
  other                the rest (views, autograd bookkeeping, Python)

For each matmul class the achieved rate (its FLOPs from the shapes over its self time) is given
against the bf16 matmul peak measured in the same process, and the step time the whole run would
take if every matmul ran at that peak and nothing else cost anything (the roofline) is compared
with the measured step: that ratio is the roofline share train_speed.py reports, by another route.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench_sft import cpu_description
from sft_paths import Job, run_lorakit
from sft_workload import LORA, SIZES, build_model, make_tokenizer, workload_rows
from speed_paths import best_rate, bf16_matmul_rate

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::scaled_dot_product")
COMPILED = ("CompiledFunction", "Torch-Compiled Region", "## Call CompiledFxGraph", "cpp_fused", "graph_")
COPIES = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to")
OPTIMIZER = ("aten::_fused_adam", "aten::_foreach", "Optimizer.")
LOSS = ("_ChunkedCrossEntropy", "aten::_log_softmax", "aten::nll_loss", "aten::log_softmax")
ELEMENTWISE = tuple(f"aten::{name}" for name in (
    "mul", "add", "sub", "div", "silu", "pow", "rsqrt", "mean", "neg", "cat", "sum", "masked_fill", "_softmax",
    "exp", "where", "sigmoid", "fill_", "zero_", "index", "embedding", "cos", "sin", "tanh", "gelu", "threshold"))


def matmul_dims(event: Any) -> tuple[int, int, int] | None:
    """(m, k, n) of a matmul event from its input shapes: mm/bmm(a, b[, out]), addmm/baddbmm(c, a, b[, out])."""
    shapes = list(event.input_shapes or [])
    first = 1 if event.key.startswith(("aten::addmm", "aten::baddbmm")) else 0
    if len(shapes) < first + 2 or len(shapes[first]) not in (2, 3) or len(shapes[first + 1]) not in (2, 3):
        return None
    a, b = shapes[first], shapes[first + 1]
    if len(a) == 3:  # bmm: batch folded into m
        return a[0] * a[1], a[2], b[-1]
    return a[0], a[1], b[1]


def classify(event: Any, rank: int, vocab: int) -> str:
    key = event.key  # FunctionEvent.key is its name
    if key.startswith(MATMULS):
        dims = matmul_dims(event)
        if dims is None:
            return "base matmuls"
        if vocab in dims:
            return "head + loss"
        return "LoRA products" if rank in dims else "base matmuls"
    for prefixes, family in ((ATTENTION, "attention"), (COMPILED, "compiled kernels"), (COPIES, "copies and casts"),
                             (OPTIMIZER, "optimizer"), (LOSS, "head + loss"), (ELEMENTWISE, "eager elementwise")):
        if key.startswith(prefixes):
            return family
    return "other"


def account(args: argparse.Namespace) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    size = SIZES[args.size]
    tokenizer = make_tokenizer(size, 0)
    rows = workload_rows(args.steps * size.micro_batch * size.grad_accum, size, tokenizer, 0)
    job = Job(size=size, model=build_model(size, 0, tokenizer), tokenizer=tokenizer, rows=rows, steps=args.steps,
              warmup=args.warmup, lr=1e-3, seed=0, device="cpu", precision="bf16", chunked_loss=True,
              compile=args.compile, lora_dropout=0.0)
    vocab = job.model.config.vocab_size
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    ticks: list[float] = []

    def tick(optimizer: Any, a: Any, k: Any) -> None:  # profile the steps after the warmup ones
        ticks.append(time.process_time())
        if len(ticks) == args.warmup:
            prof.start()
        elif len(ticks) == args.steps:
            prof.stop()

    handle = register_optimizer_step_post_hook(tick)
    try:
        with tempfile.TemporaryDirectory(prefix="step-account-") as scratch:
            run = run_lorakit(job, Path(scratch))
    finally:
        handle.remove()
    measured_steps = args.steps - args.warmup
    cpu_seconds = ticks[-1] - ticks[args.warmup - 1]
    real_tokens = sum(run["step_real_tokens"][args.warmup:])
    families: dict[str, dict[str, float]] = defaultdict(lambda: {"seconds": 0.0, "flops": 0.0, "calls": 0})
    for event in prof.events():
        family = classify(event, LORA["r"], vocab)
        entry = families[family]
        entry["seconds"] += event.self_cpu_time_total / 1e6
        entry["calls"] += 1
        # a matmul that dispatches to another (autocast's wrapper around the kernel) carries no FLOPs of its own
        dims = matmul_dims(event) if event.key.startswith(MATMULS) else None
        if dims is not None and not any(child.key.startswith(MATMULS) for child in event.cpu_children):
            entry["flops"] += 2 * dims[0] * dims[1] * dims[2]
    peak = best_rate([bf16_matmul_rate(size.hidden, size.intermediate) for _ in range(2)])
    profiled = sum(entry["seconds"] for entry in families.values())
    matmul_flops = sum(entry["flops"] for entry in families.values())
    rows_out = {}
    for family, entry in sorted(families.items(), key=lambda kv: -kv[1]["seconds"]):
        rate = entry["flops"] / entry["seconds"] if entry["flops"] and entry["seconds"] else None
        rows_out[family] = {**entry, "share": entry["seconds"] / profiled,
                            "gflops_per_s": rate / 1e9 if rate else None,
                            "of_peak": rate / peak["flops_per_cpu_s"] if rate else None}
    at_peak = matmul_flops / peak["flops_per_cpu_s"]  # seconds if every matmul ran at the peak, nothing else
    return {"settings": {"size": args.size, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                         "compile": args.compile, "lora": LORA | {"dropout": 0.0}},
            "environment": {"torch": torch.__version__, **cpu_description()},
            "peak": peak, "measured_steps": measured_steps, "cpu_seconds": cpu_seconds,
            "profiled_seconds": profiled, "real_tokens": real_tokens,
            "real_tokens_per_cpu_s": real_tokens / cpu_seconds, "matmul_flops": matmul_flops,
            "matmul_seconds_at_peak": at_peak, "matmul_roofline_share": at_peak / profiled, "families": rows_out}


def report(result: dict[str, Any]) -> str:
    peak = result["peak"]["flops_per_cpu_s"] / 1e9
    lines = [f"{result['environment']['cpu_model']} ({result['environment']['cpu_family']}), "
             f"{result['settings']['threads']} thread(s); bf16 matmul peak {peak:.0f} GFLOP per CPU-second",
             f"{result['measured_steps']} steps profiled: {result['profiled_seconds']:.2f} s of self CPU time "
             f"({result['cpu_seconds']:.2f} s process CPU time, profiler included), "
             f"{result['real_tokens']} real tokens",
             f"{'':20}{'share':>8}{'seconds':>9}{'calls':>8}{'GFLOP/s':>9}{'of peak':>9}"]
    for family, entry in result["families"].items():
        rate = f"{entry['gflops_per_s']:9.0f}{entry['of_peak']:9.0%}" if entry["gflops_per_s"] else ""
        lines.append(f"{family:20}{entry['share']:8.1%}{entry['seconds']:9.2f}{entry['calls']:8d}{rate}")
    lines.append(f"every matmul at the peak and nothing else: {result['matmul_seconds_at_peak']:.2f} s, "
                 f"{result['matmul_roofline_share']:.1%} of the profiled time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps, warmup included")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling starts (compiling happens here)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(args.threads)
    result = account(args)
    result["command"] = " ".join(["python", "benchmarks/step_account.py", *(argv if argv is not None else sys.argv[1:])])
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
