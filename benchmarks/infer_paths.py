"""Generation speed for benchmarks/train_speed.py: transformers `generate` on a peft model vs lorakit.

The same randomly initialised model as the training benchmark (built from the size's config),
one LoRA adapter (r=16, alpha=32, the seven projections) whose B is random so that it changes
the output, saved once in PEFT format. Each side runs in its own forked child:

- `peft-generate`: `peft.PeftModel.from_pretrained` + `model.generate` (greedy, KV cache, the
  prompts in one left-padded batch): what most tutorials serve with;
- `lorakit`: `lorakit.load_adapter` + lorakit's decoding loop (`infer.decode`, what `lorakit
  generate` and `lorakit serve` run), LoRA unmerged;
- `lorakit-merged`: the same after `lorakit.merge` (one adapter served at base-model cost).

Every side generates exactly `new_tokens` tokens per prompt (no end-of-sequence stop), once
untimed, then `repeats` timed runs (the median CPU time counts); the JSON says whether the token
ids are identical across sides.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from sft_workload import LORA, SIZES, build_model, make_tokenizer

SIDES = ("peft-generate", "lorakit", "lorakit-merged")


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
    from lorakit.infer.decode import left_pad

    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


def _generate_lorakit(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    from lorakit.infer.decode import decode
    from lorakit.infer.sampling import Sampling

    return decode(model, prompts, [Sampling()] * len(prompts), max_new_tokens=[new_tokens] * len(prompts),
                  stop_ids=set(), pad_id=pad_id)


def child_main(side: str, size_name: str, seed: int, threads: int, adapter: Path, prompts: list[list[int]],
               new_tokens: int, repeats: int, out: Path) -> None:
    """Load one side, generate once untimed and `repeats` times timed, write ids and the median time as JSON."""
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
    if side == "peft-generate":
        from peft import PeftModel

        model, generate = PeftModel.from_pretrained(model, str(adapter)), _generate_peft
    else:
        model, generate = lorakit.load_adapter(model, adapter), _generate_lorakit
        if side == "lorakit-merged":
            model = lorakit.merge(model)
    model.eval()
    times = []
    with torch.no_grad():
        generate(model, prompts, new_tokens, tokenizer.pad_token_id)  # warm-up, untimed
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            ids = generate(model, prompts, new_tokens, tokenizer.pad_token_id)
            times.append((time.process_time() - cpu, time.perf_counter() - wall))
    cpu, wall = sorted(times)[len(times) // 2]  # the run with the median CPU time
    new = sum(len(row) for row in ids)
    out.write_text(json.dumps({"side": side, "ids": ids, "new_tokens": new, "wall_seconds": wall, "cpu_seconds": cpu,
                               "tokens_per_s": new / wall, "tokens_per_cpu_s": new / cpu, "repeats": repeats,
                               "threads": torch.get_num_threads()}))


def run_side(side: str, *args: Any) -> dict[str, Any]:
    """One side in a forked child; returns its measurements."""
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="infer-speed-") as scratch:
        out = Path(scratch) / "result.json"
        child = context.Process(target=child_main, args=(side, *args, out), name=f"infer-{side}")
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the {side} generation child failed with exit code {child.exitcode} (traceback above)")
        return json.loads(out.read_text())


def measure(size_name: str, seed: int, threads: int, prompts: int, new_tokens: int, repeats: int,
            multi_repeats: int) -> dict[str, Any]:
    """Every side on the same adapter and prompts, then the multi-adapter comparison."""
    import multi_adapter

    size = SIZES[size_name]
    prompt_ids = make_prompts(make_tokenizer(size, seed), prompts, 32, min(128, size.max_length // 2), seed)
    with tempfile.TemporaryDirectory(prefix="infer-adapter-") as folder:
        adapter = save_adapter(size_name, seed, Path(folder))
        runs = [run_side(side, size_name, seed, threads, adapter, prompt_ids, new_tokens, repeats) for side in SIDES]
    reference = runs[0]["ids"]
    for run in runs:
        run["same_ids_as_peft"] = sum(a == b for a, b in zip(run.pop("ids"), reference))
        run["vs_peft"] = run["tokens_per_cpu_s"] / runs[0]["tokens_per_cpu_s"]
    multi = multi_adapter.measure(repeats=multi_repeats) if multi_repeats else None
    return {"prompts": prompts, "prompt_tokens": [32, min(128, size.max_length // 2)], "new_tokens": new_tokens,
            "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "targets": LORA["targets"]}, "runs": runs,
            "multi_adapter": multi}


def table(inference: dict[str, Any]) -> str:
    """The generation sides side by side, ratios to peft's generate."""
    runs = inference["runs"]
    width = max(16, *(len(r["side"]) + 2 for r in runs))
    lines = [f"generation: {inference['prompts']} prompts of {inference['prompt_tokens'][0]}-"
             f"{inference['prompt_tokens'][1]} tokens, {inference['new_tokens']} new tokens each, greedy",
             f"{'':24}" + "".join(f"{r['side']:>{width}}" for r in runs)]
    for label, key, fmt in (("new tokens/s (wall)", "tokens_per_s", "{:.0f}"),
                            ("new tokens/CPU-s", "tokens_per_cpu_s", "{:.0f}"),
                            ("  vs peft-generate", "vs_peft", "{:.2f}x"),
                            ("same ids as peft", "same_ids_as_peft", "{}")):
        lines.append(f"{label:24}" + "".join(f"{fmt.format(r[key]):>{width}}" for r in runs))
    multi = inference["multi_adapter"]
    if multi:
        lines.append(f"multi-adapter batch ({multi['adapters']} adapters, {multi['prompts']} prompts, embedded model): "
                     f"{multi['speedup_vs_peft_set_adapter_loop']:.2f}x the peft set_adapter loop "
                     f"(CPU-seconds), same text {multi['same_text']}")
    return "\n".join(lines)
