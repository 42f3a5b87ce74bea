"""Per-row multi-adapter generation against peft's set_adapter loop.

    python benchmarks/multi_adapter.py --adapters 8 --prompts 32 --max-new-tokens 32 --out results/multi.json

Same base model (the embedded one), the same N random LoRA adapters (r=8, all linear layers,
saved in PEFT format), the same prompts (prompt i goes to adapter i mod N), greedy decoding:

- lorakit: one base model, every adapter added by name (lorakit.adapters.multi), all prompts in
  ONE batch whose rows use different adapters (one forward per step, nothing merged);
- peft: PeftModel with every adapter loaded, then for each adapter `set_adapter(name)` and
  `model.generate` on that adapter's prompts, one group after another.

Both run the whole workload once untimed first (steady state). Speed is process CPU time on one thread (robust
to other jobs on the machine); the JSON also says whether both produced the same text for every
prompt.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

COUNTRIES = ["France", "Peru", "Japan", "Kenya", "Chile", "Norway", "Egypt", "India", "Spain", "Ghana", "Nepal",
             "Cuba", "Mali", "Laos", "Iran", "Iraq"]


def make_adapters(folder: Path, count: int, r: int) -> list[Path]:
    """`count` LoRA adapters on the embedded model with random B (so each changes the output)."""
    import lorakit
    from lorakit.models import load_model

    paths = []
    for index in range(count):
        torch.manual_seed(index)  # lora_A's random init: the same adapters on every run
        model = lorakit.apply(load_model("embedded"), lorakit.LoRA(r=r, alpha=2 * r, targets="all-linear"))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        paths.append(lorakit.save_adapter(model, folder / f"a{index}", base_model_name_or_path="embedded"))
    return paths


def run_lorakit(paths, prompts, owners, tokenizer, max_new_tokens: int) -> tuple[list[str], float]:
    from lorakit.adapters.multi import add_adapter
    from lorakit.infer.generate import generate_texts
    from lorakit.models import load_model

    model = load_model("embedded").eval()
    for index, path in enumerate(paths):
        add_adapter(model, f"a{index}", path)
    for _ in range(2):  # the first pass is an untimed warm-up (steady-state serving)
        start = time.process_time()
        texts = generate_texts(model, tokenizer, prompts, adapters=[f"a{o}" for o in owners], chat=False,
                               max_new_tokens=max_new_tokens)
    return texts, time.process_time() - start


def run_peft(paths, prompts, owners, tokenizer, max_new_tokens: int) -> tuple[list[str], float]:
    from peft import PeftModel

    from lorakit.models import load_model

    model = PeftModel.from_pretrained(load_model("embedded"), str(paths[0]), adapter_name="a0").eval()
    for index, path in enumerate(paths[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    tokenizer.padding_side = "left"
    for _ in range(2):  # the first pass is an untimed warm-up, as for lorakit
        texts, seconds = _peft_pass(model, prompts, owners, tokenizer, max_new_tokens, len(paths))
    return texts, seconds


def _peft_pass(model, prompts, owners, tokenizer, max_new_tokens: int, count: int) -> tuple[list[str], float]:
    texts = [""] * len(prompts)
    start = time.process_time()
    with torch.no_grad():
        for index in range(count):
            rows = [i for i, owner in enumerate(owners) if owner == index]
            model.set_adapter(f"a{index}")
            encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True)
            out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            for row, text in zip(rows, decoded):
                texts[row] = text
    return texts, time.process_time() - start


def measure(adapters: int = 8, prompts: int = 32, max_new_tokens: int = 32, rank: int = 8,
            repeats: int = 3) -> dict:
    """Both pipelines `repeats` times on the same adapters and prompts; medians of process CPU time."""
    torch.set_num_threads(1)
    from lorakit.models import load_tokenizer, quiet_progress_bars

    quiet_progress_bars()
    tokenizer = load_tokenizer("embedded")
    texts = [f"Question: What is the capital of {COUNTRIES[i % len(COUNTRIES)]}?\nAnswer:" for i in range(prompts)]
    owners = [i % adapters for i in range(prompts)]
    with tempfile.TemporaryDirectory() as folder:
        paths = make_adapters(Path(folder), adapters, rank)
        runs = {"lorakit": [run_lorakit(paths, texts, owners, tokenizer, max_new_tokens) for _ in range(repeats)],
                "peft": [run_peft(paths, texts, owners, tokenizer, max_new_tokens) for _ in range(repeats)]}
    cpu = {name: sorted(t for _, t in results)[len(results) // 2] for name, results in runs.items()}
    same = sum(a == b for a, b in zip(runs["lorakit"][0][0], runs["peft"][0][0]))
    return {"adapters": adapters, "prompts": prompts, "max_new_tokens": max_new_tokens, "rank": rank,
            "cpu_seconds": cpu, "speedup_vs_peft_set_adapter_loop": cpu["peft"] / cpu["lorakit"],
            "same_text": f"{same}/{prompts}", "distinct_answers": len(set(runs["lorakit"][0][0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median counts")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    result = measure(args.adapters, args.prompts, args.max_new_tokens, args.rank, args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()
