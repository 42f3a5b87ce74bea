"""Generation speed: transformers `generate` on a peft model vs lorakit's decoding loop, per batch and per request.

    python benchmarks/infer_paths.py --size smollm --repeats 5 --out infer.json     (or via train_speed.py)

The same randomly initialised model as the training benchmark (built from the size's config),
one LoRA adapter (r=16, alpha=32, the seven projections) whose B is random so that it changes
the output, saved once in PEFT format. Two long-lived forked children hold the model:

- `peft`: `peft.PeftModel.from_pretrained` + `model.generate` (greedy, KV cache, the prompts in one
  left-padded batch): what most tutorials serve with;
- `lorakit`: `lorakit.load_adapter` + lorakit's decoding loop (`infer.decode`, what `lorakit generate`
  and `lorakit serve` run) in three variants: `lorakit` (the default, every speed-up), `lorakit-unmerged`
  (every speed-up but the merged LoRA weights), `lorakit-plain` (none: the loop as it was before them).

Two workloads: the batch (`prompts` prompts in one call) and single requests (the first `single`
prompts, each alone in its own call: what one chat user or one server request gets). Every side
generates exactly `new_tokens` tokens per prompt (no end-of-sequence stop). Each case runs once untimed,
then `repeats` rounds, each running every case once in a rotated order (so no case always follows the
same one); only one child computes at a time. Times are the child's CPU-seconds (one thread: robust to other
jobs, though not to a busy machine's memory bandwidth). Reported per case: the median, and the ratio to peft's
generate taken within each round (median, min and max over rounds). Every lorakit variant must produce peft's
token ids for every prompt: the table says NOT EXACT otherwise, and this script then exits with an error.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from sft_workload import LORA, SIZES, build_model, make_tokenizer

CASES = {"batch": ("peft-generate", "lorakit-plain", "lorakit-unmerged", "lorakit"),
         "single": ("peft-generate", "lorakit-plain", "lorakit")}


def make_prompts(tokenizer: Any, count: int, low: int, high: int, seed: int) -> list[list[int]]:
    """`count` prompts of `low`-`high` token ids, drawn from the tokenizer's ordinary tokens."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [[rng.choice(vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def save_adapter(size_name: str, seed: int, folder: Path) -> Path:
    """The benchmark's LoRA adapter (random B) in PEFT format under `folder`."""
    import torch

    import lorakit

    size = SIZES[size_name]
    model = build_model(size, seed, make_tokenizer(size, seed))
    targets = LORA["targets"]
    lorakit.apply(model, lorakit.LoRA(r=LORA["r"], alpha=LORA["alpha"], targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return lorakit.save_adapter(model, folder / "adapter")


def _generate_peft(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    from lorakit.decoding.decode import left_pad

    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


def _generate_lorakit(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int,
                      variant: str = "lorakit") -> list[list[int]]:
    from lorakit.decoding.decode import PLAIN, Speedups, decode
    from lorakit.decoding.sampling import Sampling

    speedups = {"lorakit": Speedups(), "lorakit-unmerged": Speedups(merged_lora=False), "lorakit-plain": PLAIN}
    return decode(model, prompts, [Sampling()] * len(prompts), max_new_tokens=[new_tokens] * len(prompts),
                  stop_ids=set(), pad_id=pad_id, speedups=speedups[variant])


def child_main(kind: str, size_name: str, seed: int, threads: int, adapter: Path, prompts: list[list[int]],
               new_tokens: int, single: int, connection: Any) -> None:
    """Load one side, then answer (workload, variant) requests with (CPU s, wall s, ids) until told to stop."""
    import torch

    import lorakit

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    size = SIZES[size_name]
    tokenizer = make_tokenizer(size, seed)
    model = build_model(size, seed, tokenizer)
    model.generation_config.eos_token_id = None  # every side generates exactly new_tokens tokens
    if kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    else:
        model = lorakit.load_adapter(model, adapter)
    model.eval()
    pad = tokenizer.pad_token_id
    connection.send(("ready", torch.get_num_threads()))
    while (request := connection.recv()) is not None:
        workload, variant = request
        batches = [prompts] if workload == "batch" else [[p] for p in prompts[:single]]
        with torch.no_grad():
            wall, cpu = time.perf_counter(), time.process_time()
            ids = [row for batch in batches for row in (
                _generate_peft(model, batch, new_tokens, pad) if kind == "peft"
                else _generate_lorakit(model, batch, new_tokens, pad, variant))]
            connection.send((time.process_time() - cpu, time.perf_counter() - wall, ids))


def run_cases(size_name: str, seed: int, threads: int, adapter: Path, prompts: list[list[int]], new_tokens: int,
              single: int, repeats: int) -> tuple[dict[tuple[str, str], list[tuple[float, float]]], dict, int]:
    """Every case once untimed, then `repeats` rotated rounds: {(workload, side): [(cpu s, wall s) per round]},
    {(workload, side): ids}, threads."""
    context = multiprocessing.get_context("fork")
    pipes, children = {}, {}
    for kind in ("peft", "lorakit"):
        mine, theirs = context.Pipe()
        children[kind] = context.Process(target=child_main, name=f"infer-{kind}", args=(
            kind, size_name, seed, threads, adapter, prompts, new_tokens, single, theirs))
        children[kind].start()
        pipes[kind] = mine
    try:
        threads_used = [pipes[kind].recv()[1] for kind in pipes][0]
        cases = [(workload, side) for workload, sides in CASES.items() for side in sides
                 if workload == "batch" or single]
        times: dict[tuple[str, str], list[tuple[float, float]]] = {case: [] for case in cases}
        ids: dict[tuple[str, str], list[list[int]]] = {}
        for round_ in range(repeats + 1):  # round 0: untimed warm-up
            for workload, side in cases[round_ % len(cases):] + cases[:round_ % len(cases)]:
                kind = "peft" if side == "peft-generate" else "lorakit"
                pipes[kind].send((workload, side))
                cpu, wall, ids[(workload, side)] = pipes[kind].recv()
                if round_:
                    times[(workload, side)].append((cpu, wall))
        return times, ids, threads_used
    finally:
        for kind, pipe in pipes.items():
            try:
                pipe.send(None)
            except OSError:
                pass
            children[kind].join(timeout=60)
            if children[kind].exitcode not in (0, None):
                raise SystemExit(f"the {kind} generation child failed with exit code {children[kind].exitcode}")


def summarise(times, ids, prompts: int, single: int, new_tokens: int) -> dict[str, list[dict[str, Any]]]:
    """Per workload, each side's median rates and its per-round ratio to peft's generate."""
    out = {}
    for workload, sides in CASES.items():
        if (workload, sides[0]) in times:
            tokens = new_tokens * (prompts if workload == "batch" else single)
            reference, rows = times[(workload, sides[0])], []
            for side in sides:
                runs = times[(workload, side)]
                ratios = [peft[0] / mine[0] for peft, mine in zip(reference, runs)]
                cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
                rows.append({"side": side, "new_tokens": tokens, "cpu_seconds": [c for c, _ in runs],
                             "wall_seconds": [w for _, w in runs], "tokens_per_cpu_s": tokens / cpu,
                             "tokens_per_s": tokens / wall, "vs_peft": statistics.median(ratios),
                             "vs_peft_range": [min(ratios), max(ratios)],
                             "same_ids_as_peft": sum(a == b for a, b in zip(ids[(workload, side)],
                                                                             ids[(workload, sides[0])]))})
            out[workload] = rows
    return out


def measure(size_name: str, seed: int, threads: int, prompts: int, new_tokens: int, repeats: int,
            multi_repeats: int, single: int = 4) -> dict[str, Any]:
    """Every case on the same adapter and prompts, then the multi-adapter comparison; `not_exact` lists the cases
    whose token ids differ from peft's (main() fails on any)."""
    import multi_adapter

    size = SIZES[size_name]
    prompt_ids = make_prompts(make_tokenizer(size, seed), prompts, 32, min(128, size.max_length // 2), seed)
    single = min(single, prompts)
    with tempfile.TemporaryDirectory(prefix="infer-adapter-") as folder:
        adapter = save_adapter(size_name, seed, Path(folder))
        times, ids, threads_used = run_cases(size_name, seed, threads, adapter, prompt_ids, new_tokens, single,
                                             max(repeats, 1))
    workloads = summarise(times, ids, prompts, single, new_tokens)
    multi = multi_adapter.measure(repeats=multi_repeats) if multi_repeats else None
    result = {"prompts": prompts, "single": single, "prompt_tokens": [32, min(128, size.max_length // 2)],
              "new_tokens": new_tokens, "repeats": max(repeats, 1), "threads": threads_used,
              "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "targets": LORA["targets"]}, "workloads": workloads,
              "runs": workloads["batch"], "multi_adapter": multi}
    result["not_exact"] = [f"{w}/{r['side']}: {r['same_ids_as_peft']}/{len(ids[(w, r['side'])])}"
                           for w, rows in workloads.items() for r in rows
                           if r["same_ids_as_peft"] != len(ids[(w, r["side"])])]
    return result


def table(inference: dict[str, Any]) -> str:
    """The sides of each workload side by side, ratios to peft's generate."""
    lines = [f"generation: {inference['new_tokens']} new tokens per prompt of {inference['prompt_tokens'][0]}-"
             f"{inference['prompt_tokens'][1]} tokens, greedy, {inference.get('threads', '?')} thread(s); "
             f"CPU-seconds, median of {inference.get('repeats', '?')} interleaved rounds; ratios per round "
             "(median, min-max)"]
    workloads = inference.get("workloads", {"batch": inference["runs"]})
    for workload, rows in workloads.items():
        width = max(16, *(len(r["side"]) + 2 for r in rows))
        title = (f"batch: {inference['prompts']} prompts in one call" if workload == "batch"
                 else f"single requests: {inference['single']} prompts, each alone in its call (batch of 1)")
        lines += ["", title, f"{'':24}" + "".join(f"{r['side']:>{width}}" for r in rows)]
        for label, value in (("new tokens/s (wall)", lambda r: f"{r['tokens_per_s']:.1f}"),
                             ("new tokens/CPU-s", lambda r: f"{r['tokens_per_cpu_s']:.1f}"),
                             ("  vs peft-generate", lambda r: f"{r['vs_peft']:.2f}x"),
                             ("  min-max over rounds", lambda r: "{:.2f}-{:.2f}".format(*r.get("vs_peft_range",
                                                                                               [r["vs_peft"]] * 2))),
                             ("same ids as peft", lambda r: f"{r['same_ids_as_peft']}")):
            lines.append(f"{label:24}" + "".join(f"{value(r):>{width}}" for r in rows))
    if inference.get("not_exact"):
        lines.append("NOT EXACT: token ids differ from peft's generate in " + ", ".join(inference["not_exact"]))
    multi = inference["multi_adapter"]
    if multi:
        lines.append(f"multi-adapter batch ({multi['adapters']} adapters, {multi['prompts']} prompts, embedded model): "
                     f"{multi['speedup_vs_peft_set_adapter_loop']:.2f}x the peft set_adapter loop "
                     f"(CPU-seconds), same text {multi['same_text']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per child; 0 = torch's default")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the batch")
    parser.add_argument("--single", type=int, default=4, help="prompts run one per call (0: no single requests)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the untimed one")
    parser.add_argument("--multi-repeats", type=int, default=0, help="multi-adapter comparison repeats (0: skip)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.size, args.seed, args.threads, args.prompts, args.new_tokens, args.repeats,
                     args.multi_repeats, args.single)
    result["command"] = " ".join(["python", "benchmarks/infer_paths.py", *(argv if argv is not None else [])])
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if result["not_exact"]:
        raise SystemExit("lorakit's token ids differ from peft's generate: " + ", ".join(result["not_exact"]))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
