"""LoRA dropout on the CPU: torch's nn.Dropout mask against lorakit's, eager and compiled, side by side.

    python benchmarks/dropout_mask.py                 # 1,024 tokens x 576 features, bf16, p = 0.05, 1 thread

Times the forward and backward pass of the LoRA A products of two projections that share their
input x (as q and v do), each on its own dropped-out copy: dropout(x) @ A^T, with the r=16
products alone (no dropout) as the reference, in one process, interleaved rounds, median per
variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lorakit.adapters.dropout import LoRADropout


class Pair(nn.Module):
    """The LoRA A products of two projections of one input, each after its own dropout module."""

    def __init__(self, features: int, rank: int, make_dropout: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(features, rank, bias=False), nn.Linear(features, rank, bias=False)
        self.drop_a, self.drop_b = make_dropout(), make_dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.drop_a(x).float()) + self.b(self.drop_b(x).float())


def variants(p: float, features: int, rank: int) -> dict[str, nn.Module]:
    """name -> a Pair, eager and compiled, without dropout, with nn.Dropout and with lorakit's."""
    torch.manual_seed(0)
    plain = {"no dropout": Pair(features, rank, nn.Identity),
             "nn.Dropout": Pair(features, rank, lambda: nn.Dropout(p)),
             "lorakit": Pair(features, rank, lambda: LoRADropout(p))}
    compiled = {f"{name}, compiled": torch.compile(module, dynamic=False) for name, module in plain.items()}
    return {**plain, **compiled}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--features", type=int, default=576)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="forward+backward calls per timed round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.features, dtype=torch.bfloat16, requires_grad=True)
    runs = variants(args.p, args.features, args.rank)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for module in runs.values():  # compile and warm up, untimed
        for _ in range(2):
            module(x).sum().backward()
    for _ in range(args.rounds):
        for name, module in runs.items():
            start = time.process_time()
            for _ in range(args.calls):
                module(x).sum().backward()
            times[name].append((time.process_time() - start) / args.calls * 1e3)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"LoRA A products of two projections sharing a {args.tokens} x {args.features} bf16 input, r={args.rank}, "
          f"p={args.p}, {args.threads} thread(s): CPU ms per forward+backward (median of {args.rounds} rounds)")
    for name, ms in median.items():
        print(f"  {name:24} {ms:8.2f} ms")
    for mode in ("", ", compiled"):
        print(f"nn.Dropout / lorakit{mode or ', eager'}: {median['nn.Dropout' + mode] / median['lorakit' + mode]:.2f}x")
    result = {"settings": vars(args) | {"out": str(args.out)}, "cpu_ms": median, "rounds_ms": times,
              "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
