"""Where lorakit's training time goes, on the benchmark's SFT job.

    python benchmarks/profile_lorakit.py --size small --threads 1 --out profile.json

Three parts, all in one process on the CPU (tokens/s are steady-state target tokens, as in
bench_sft.py; no memory numbers here, use bench_sft.py for those):
  breakdown  torch.profiler over a lorakit run: self time per op family and the top ops;
  ablations  the same lorakit run with one thing changed (padding instead of packing, no LoRA
             dropout, optionally torch.compile), as tokens/s relative to the default;
  micro      two kernels in isolation: attention over packed rows with the block mask against
             per-example causal attention (what a variable-length kernel computes), and the
             LoRA branch as written against a fused addmm form.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sft_paths import Job, run_lorakit
from sft_workload import LORA, SIZES, build_model, make_tokenizer, workload_rows

# op-name prefix -> family, first match wins
FAMILIES = [("aten::_scaled_dot_product", "attention"), ("aten::bernoulli", "dropout RNG"),
            ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
            ("aten::_log_softmax", "log-softmax / CE"), ("aten::nll_loss", "log-softmax / CE"),
            ("aten::_fused_adamw", "optimizer"), ("aten::_foreach", "optimizer")]


def make_job(args: argparse.Namespace, **changes: Any) -> Job:
    """A fresh job (new model: lorakit adapts it in place) with optional field changes."""
    size = SIZES[args.size]
    tokenizer = make_tokenizer(size, 0)
    rows = workload_rows(args.steps * size.micro_batch * size.grad_accum, size, tokenizer, 0)
    job = Job(size=size, model=build_model(size, 0, tokenizer), tokenizer=tokenizer, rows=rows, steps=args.steps,
              warmup=args.warmup, lr=1e-3, seed=0, device="cpu", precision="fp32")
    return dataclasses.replace(job, **changes)


def run(job: Job) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="profile-lorakit-") as scratch:
        return run_lorakit(job, Path(scratch))


def breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Self CPU time per op family and the top ops of one profiled lorakit run."""
    from torch.profiler import ProfilerActivity, profile

    job = make_job(args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(job)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    families: dict[str, float] = defaultdict(float)
    for event in events:
        family = next((f for prefix, f in FAMILIES if event.key.startswith(prefix)), "other (elementwise, copies, ...)")
        families[family] += event.self_cpu_time_total / total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"families": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top]}


def ablations(args: argparse.Namespace) -> dict[str, Any]:
    """Medians over repeats of lorakit variants; ratios are against the default (packed, LoRA dropout on).

    The variants run in a rotating order; tokens per CPU-second is the figure to trust on a busy
    machine (with one thread it is compute time, whatever else runs on the cores).
    """
    variants: dict[str, dict[str, Any]] = {f"default (packed, dropout {LORA['dropout']:g})": {},
                                           "padded, not packed": {"pack": False}, "LoRA dropout 0": {"lora_dropout": 0.0}}
    if args.compile:
        variants["torch.compile"] = {"compile": True}
    names = list(variants)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            runs[name].append(run(make_job(args, **variants[name])))
    results = {name: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "tokens_per_cpu_s",
                                                                              "padding_fraction")}
               for name, rs in runs.items()}
    base = results[names[0]]
    for r in results.values():
        r["vs_default"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
    return results


def timed(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_micro(args: argparse.Namespace) -> dict[str, float]:
    """Forward+backward of attention on packed rows: block mask over the whole row vs per example."""
    from lorakit.data import DataConfig, make_batches, tokenize_rows

    job = make_job(args)
    size = job.size
    examples, _ = tokenize_rows(job.rows, job.tokenizer, DataConfig(format="prompt_completion", max_length=size.max_length))
    batch = make_batches(examples, 3, pack=True, max_length=size.max_length, pad_id=0, seed=0, epoch=0)[0]
    rows, width = batch["input_ids"].shape
    heads, head_dim = size.heads, size.hidden // size.heads
    q, k, v = (torch.randn(rows, heads, width, head_dim, requires_grad=True) for _ in range(3))  # (B, H, T, D)
    mask = batch["attention_mask"]  # (B, 1, T, T)
    starts = (batch["position_ids"] == 0).nonzero().tolist()  # (row, start) of every example and pad token

    def masked() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    def per_example() -> None:
        total = 0
        for row in range(rows):
            bounds = [s for r, s in starts if r == row] + [width]
            for a, b in zip(bounds, bounds[1:]):
                total = total + F.scaled_dot_product_attention(q[row:row + 1, :, a:b], k[row:row + 1, :, a:b],
                                                               v[row:row + 1, :, a:b], is_causal=True).sum()
        total.backward()

    return {"rows": rows, "width": width, "block_mask_s": timed(masked), "per_example_s": timed(per_example),
            "mask_bytes_per_row_at_4096": 4096 * 4096 * 4}


def lora_branch_micro(args: argparse.Namespace) -> dict[str, float]:
    """Forward+backward of one adapted MLP projection: the branch as written vs scale folded into addmm."""
    size = SIZES[args.size]
    n, d_in, d_out, r = 3 * size.max_length, size.hidden, size.intermediate, LORA["r"]
    scale = LORA["alpha"] / r
    x = torch.randn(n, d_in)
    weight = torch.randn(d_out, d_in) / d_in**0.5
    A = (torch.randn(r, d_in) / d_in**0.5).requires_grad_()
    B = (torch.randn(d_out, r) * 0.01).requires_grad_()
    x.requires_grad_()

    def as_written() -> None:  # lorakit.adapters.lora_math.lora_branch + the layer's add
        (F.linear(x, weight) + F.linear(F.linear(x, A), B) * scale).sum().backward()

    def fused() -> None:  # out = x W^T + scale * (x A^T) B^T in one GEMM epilogue
        torch.addmm(F.linear(x, weight), F.linear(x, A), B.t(), alpha=scale).sum().backward()

    return {"tokens": n, "d_in": d_in, "d_out": d_out, "as_written_s": timed(as_written), "fused_addmm_s": timed(fused)}


def report(result: dict[str, Any]) -> str:
    """The profile as readable lines."""
    lines = ["self CPU time by op family (lorakit run, torch.profiler):"]
    lines += [f"  {family:34}{share:7.1%}" for family, share in result["breakdown"]["families"].items()]
    lines.append("top ops:")
    lines += [f"  {op['op'][:60]:62}{op['share']:7.1%}  x{op['calls']}" for op in result["breakdown"]["top_ops"]]
    lines.append("ablations (steady state, medians):  target tokens/s  per CPU-s  vs default (CPU-s)")
    lines += [f"  {name:34}{r['tokens_per_s']:9.0f}{r['tokens_per_cpu_s']:11.0f}{r['vs_default']:9.2f}x"
              f"  padding {r['padding_fraction']:.1%}" for name, r in result["ablations"].items()]
    attention, branch = result["micro"]["attention"], result["micro"]["lora_branch"]
    lines.append(f"attention fwd+bwd on {attention['rows']} packed rows of {attention['width']}: block mask "
                 f"{attention['block_mask_s'] * 1e3:.1f} ms, per example {attention['per_example_s'] * 1e3:.1f} ms")
    lines.append(f"LoRA layer fwd+bwd ({branch['tokens']} tokens, {branch['d_in']}->{branch['d_out']}): as written "
                 f"{branch['as_written_s'] * 1e3:.2f} ms, fused addmm {branch['fused_addmm_s'] * 1e3:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs per ablation variant; medians are reported")
    parser.add_argument("--compile", action="store_true", help="also time TrainConfig(compile=True) (slow to compile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(args.threads)
    result = {"settings": vars(args) | {"out": str(args.out)}, "breakdown": breakdown(args),
              "ablations": ablations(args), "micro": {"attention": attention_micro(args),
                                                     "lora_branch": lora_branch_micro(args)}}
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
