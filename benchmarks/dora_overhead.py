"""DoRA's training-step cost over LoRA, in process CPU time (robust to a busy machine).

    python benchmarks/dora_overhead.py --steps 12 --repeats 3 --out dora_overhead.json

One forward + backward + AdamW step on the same random Llama, the same batch and rank, for
lorakit LoRA, lorakit DoRA and, as the reference users compare against, peft LoRA and peft DoRA
(`use_dora=True`). Methods are interleaved round by round; each figure is the median over
rounds of the mean step CPU time. Ratios: DoRA / LoRA within each library.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.adapters.dora import DoRA

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (256, 688, 4, 8, 4, 2000),
    "medium": (512, 1376, 4, 8, 4, 4000),
}


def build(size: str) -> LlamaForCausalLM:
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).float().train()


def adapted(method: str, size: str, r: int):
    """(model, trainable params) for one of lorakit-lora, lorakit-dora, peft-lora, peft-dora."""
    library, kind = method.split("-")
    model = build(size)
    if library == "lorakit":
        cls = DoRA if kind == "dora" else lorakit.LoRA
        model = lorakit.apply(model, cls(r=r, alpha=2 * r, targets="all-linear"))
    else:
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=kind == "dora",
                                 task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def step_cpu_seconds(model, params, batch: torch.Tensor, steps: int) -> float:
    """Mean process CPU seconds of one training step (after one untimed warm-up step)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def one_step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()
    start = time.process_time()
    for _ in range(steps):
        one_step()
    return (time.process_time() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="lorakit-lora,lorakit-dora,peft-lora,peft-dora")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    batch = torch.randint(0, SIZES[args.size][5], (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    models = {m: adapted(m, args.size, args.r) for m in methods}
    rounds: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for method in methods if repeat % 2 == 0 else reversed(methods):
            rounds[method].append(step_cpu_seconds(*models[method], batch, args.steps))
    medians = {m: statistics.median(v) for m, v in rounds.items()}
    result = {"size": args.size, "r": args.r, "batch": args.batch, "length": args.length, "threads": args.threads,
              "torch": torch.__version__, "step_cpu_s": medians, "rounds": rounds}
    for library in ("lorakit", "peft"):
        if f"{library}-lora" in medians and f"{library}-dora" in medians:
            result[f"{library}_dora_over_lora"] = medians[f"{library}-dora"] / medians[f"{library}-lora"]
    if "lorakit-dora" in medians and "peft-dora" in medians:
        result["lorakit_dora_over_peft_dora"] = medians["lorakit-dora"] / medians["peft-dora"]
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
