"""QLoRA's memory against bf16 LoRA on the same model, and what merging into a 4-bit base costs.

    python benchmarks/qlora_memory.py --out qlora_memory.json

A random Llama (built from a config, saved once as bf16 safetensors) is loaded by each method in
its own child process, so every resident-set figure is that method's own:

- bytes per base parameter: storage of the quantised linear weights (4-bit codes, scales, code
  books) over their number of weights; bf16 is 2.0;
- RSS after setup (loaded + adapted), and the peak RSS over a few training steps, measured from
  a reset high-water mark (Linux /proc/self/clear_refs), for `lora` (bf16 base) and `qlora`;
- merge error (QLoRA child, after the training steps moved B away from 0): max |Δlogits| and the
  mean per-token KL(adapted || merged) on a sample batch, for the merge into a dequantised bf16
  base and for that merge re-quantised to 4 bits.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (768, 2048, 6, 12, 4, 8000),
    "medium": (1536, 4096, 8, 12, 4, 8000),
    "tiny": (128, 344, 2, 4, 2, 1000),
}


def save_base(size: str, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)


def rss_mb(field: str) -> float:
    """A /proc/self/status memory field of this process in MiB: VmRSS (resident now), VmHWM (peak since
    the last reset), RssAnon (heap: tensors and allocations), RssFile (mapped files, e.g. safetensors)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def train_steps(model, batch: torch.Tensor, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """max |Δlogits| and mean per-token KL(reference || other), computed in float32."""
    ref, oth = reference.float(), other.float()
    kl = torch.nn.functional.kl_div(oth.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_dlogits": (ref - oth).abs().max().item(), "mean_kl": kl.sum(-1).mean().item(),
            "logit_scale": ref.abs().max().item()}


def child(method: str, folder: Path, args) -> dict:
    import bitsandbytes  # noqa: F401  (imported by both children, so library memory is the same)

    import lorakit
    from lorakit.adapters.qlora import QLoRA, storage_bytes

    torch.set_num_threads(args.threads)
    baseline = {"rss_baseline_mb": rss_mb("VmRSS"), "rss_anon_baseline_mb": rss_mb("RssAnon")}
    model = lorakit.load_model(folder, dtype="bfloat16")
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    sample = batch[:, : min(64, args.length)]
    with torch.no_grad():
        base_logits = model(input_ids=sample).logits
    cfg = (QLoRA if method == "qlora" else lorakit.LoRA)(r=args.r, alpha=2 * args.r, targets="all-linear")
    model = lorakit.apply(model, cfg)
    with torch.no_grad():  # B = 0: the adapted model is the (quantised) base
        quantisation = compare(base_logits, model(input_ids=sample).logits)
    gc.collect()
    out = {"method": method, **baseline, "rss_after_setup_mb": rss_mb("VmRSS"), "peak_rss_load_mb": rss_mb("VmHWM"),
           "rss_anon_after_setup_mb": rss_mb("RssAnon"), "rss_file_after_setup_mb": rss_mb("RssFile")}
    reset_peak()
    out["losses"] = train_steps(model, batch, args.steps)
    out["peak_rss_train_mb"] = rss_mb("VmHWM")
    out["rss_anon_after_train_mb"] = rss_mb("RssAnon")
    layers = [layer for _, layer in lorakit.adapters.state.lora_layers(model)]
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    stored = sum(storage_bytes(layer.weight) if method == "qlora" else layer.weight.numel() * 2 for layer in layers)
    out["bytes_per_base_param"] = stored / weights
    out["trainable, total"] = lorakit.trainable_parameters(model)
    out["parameter_mb"] = sum(storage_bytes(p) if hasattr(p, "quant_state") else p.numel() * p.element_size()
                              for p in model.parameters()) / 2**20
    if method == "qlora":
        out["merge"] = {"base_bf16_vs_nf4_before_training": quantisation, **merge_errors(model, folder, sample)}
    return out


def merge_errors(model, folder: Path, sample: torch.Tensor) -> dict:
    """Logit differences between the adapted 4-bit model and its merges (bf16, and re-quantised)."""
    import copy

    import lorakit

    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=sample).logits
        merged = lorakit.merge(copy.deepcopy(model))
        requantized = lorakit.merge(model, requantize=True)
        return {"dequantised_bf16": compare(adapted, merged(input_ids=sample).logits),
                "requantised_nf4": compare(adapted, requantized(input_ids=sample).logits)}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.folder), args)))
        return {}
    results = {"size": args.size, "config": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads",
                                                          "vocab"), SIZES[args.size])), "r": args.r}
    with tempfile.TemporaryDirectory() as tmp:
        save_base(args.size, Path(tmp))
        for method in ("lora", "qlora"):
            cmd = [sys.executable, __file__, *argv, "--child", method, "--folder", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            results[method] = json.loads(line[len("RESULT "):])
    for key in ("parameter_mb", "peak_rss_load_mb", "peak_rss_train_mb", "rss_after_setup_mb",
                "rss_anon_after_setup_mb", "rss_anon_after_train_mb"):
        results[f"qlora_over_lora_{key.removesuffix('_mb')}"] = results["qlora"][key] / results["lora"][key]
        results[f"qlora_minus_lora_{key}"] = results["qlora"][key] - results["lora"][key]
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
