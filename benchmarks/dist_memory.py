"""Per-rank memory of full fine-tuning: 1 process against 2 FSDP2 ranks (gloo on CPU, nccl on GPU).

    python benchmarks/dist_memory.py --out benchmarks/results/dist_memory_cpu.json

The parent launches `torchrun --nproc-per-node N` for N in --ranks; each rank trains a Llama built
from a config (same seed) for a few steps through `lorakit.train.train` (method full, so
train.distributed auto picks FSDP2 under torchrun) and reports:

- state_mb: bytes this rank holds in parameters + AdamW state after training (exact, from the
  tensors: the local shards under FSDP2), plus gradients of the same size during a step;
- peak_rss_mb / rss_growth_mb: the process's peak resident memory, and its growth over the RSS
  measured before the model was built (CPU; the Python/torch baseline is the same for every rank);
- peak_cuda_mb: torch.cuda.max_memory_allocated on GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {  # (hidden, layers, intermediate, vocab)
    "tiny": (64, 2, 176, 512),
    "small": (512, 4, 1376, 8192),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def worker(size: str, steps: int, out: Path) -> None:
    """One rank: build, train `steps` steps, write this rank's numbers to out/rank-R.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.train import TrainConfig, train

    torch.set_num_threads(1)
    hidden, layers, intermediate, vocab = SIZES[size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    baseline = _rss_mb()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(device)
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": ids, "labels": ids.roll(-1, 1), "attention_mask": torch.ones_like(ids)}
               for ids in torch.randint(3, vocab, (16, 2, 128), generator=generator)]
    cfg = TrainConfig(lr=1e-4, max_steps=steps, micro_batch_size=2, grad_accum=8 // int(os.environ.get(
        "WORLD_SIZE", "1")), schedule="constant", progress="none", distributed="auto", precision="fp32",
        compile=False)  # the figures in RESULTS.md are fp32
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, cfg, train_batches=lambda epoch: batches, run_dir=run_dir)
    import torch.distributed as dist

    params = sum(_local_bytes(p) for p in model.parameters())
    optimizer = 2 * params  # AdamW: exp_avg and exp_avg_sq, each the size of the (local) parameters
    rank = dist.get_rank() if dist.is_initialized() else 0
    record = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")),
              "params": sum(p.numel() for p in model.parameters()),
              "state_mb": (2 * params + optimizer) / 2**20,  # params + grads + AdamW state
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline,
              "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(ranks: int, size: str, steps: int) -> list[dict]:
    """Run the worker under torchrun with `ranks` processes; their records, by rank."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   __file__, "--worker", "--size", size, "--steps", str(steps), "--out", out]
        # glibc keeps freed heap memory (RSS never shrinks); big blocks mmap'd are returned on free,
        # so the peak RSS follows the live tensors rather than the allocator's history
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run(command, check=True, env=env)
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.size, args.steps, args.out)
        return
    results = {str(n): launch(n, args.size, args.steps) for n in args.ranks}
    for n, records in results.items():
        for r in records:
            cuda = "" if r["peak_cuda_mb"] is None else f", peak cuda {r['peak_cuda_mb']:.1f} MB"
            print(f"{n} rank(s), rank {r['rank']}: state {r['state_mb']:.1f} MB, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(+{r['rss_growth_mb']:.0f} MB over the pre-model baseline){cuda}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
