"""Preference pairs and pair batches built by hand for the training tests, in the data room's pair-batch shape
(data/preference.py): rows 0..B-1 the chosen answers, B..2B-1 the rejected ones, labels shifted, "pairs": B.

Also the child process of the two-rank test:

    python -m torch.distributed.run --nproc-per-node 2 tests/preference_fixtures.py RUN_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from train_fixtures import TEST_THREADS, VOCAB, pad_batch, tiny_llama

FINAL = "final_trainable.safetensors"


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs sharing a random prompt: the chosen answer follows a fixed bigram rule (learnable), the rejected
    one is random tokens; answers of 2 to 5 tokens, so the two sides of a pair usually differ in length."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    pairs = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (draw(2, 5),), generator=generator).tolist()
        chosen = list(prompt)
        for _ in range(draw(2, 6)):
            chosen.append(3 + (chosen[-1] * 7 + 5) % (VOCAB - 3))
        rejected = prompt + torch.randint(3, VOCAB, (draw(2, 6),), generator=generator).tolist()
        pairs.append({side: {"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]}
                      for side, ids in (("chosen", chosen), ("rejected", rejected))})
    return pairs


def pair_batch(pairs: list[dict]) -> dict:
    """One micro-batch of `pairs`: chosen rows, then rejected rows, right-padded together, labels shifted."""
    batch = pad_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    batch["pairs"] = len(pairs)
    return batch


def pair_batches(pairs: list[dict], pairs_per_batch: int, epoch: int = 0, seed: int = 0) -> list[dict]:
    """That epoch's micro-batches: the pairs permuted by (seed, epoch), then cut into batches."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    rows = [pairs[i] for i in order]
    return [pair_batch(rows[i: i + pairs_per_batch]) for i in range(0, len(rows), pairs_per_batch)]


def lora_llama(seed: int = 0) -> torch.nn.Module:
    """The tiny training Llama with a lorakit LoRA on every linear layer."""
    from lorakit.adapters import LoRA, apply

    model = tiny_llama(seed=seed)
    torch.manual_seed(seed + 1)
    return apply(model, LoRA(r=4, alpha=8))


def ddp_scenario(run_dir: Path, grad_accum: int) -> None:
    """DPO on the LoRA Llama for 2 epochs of 10 pairs (5 micro-batches of 2 pairs, the last step short), the
    reference being the adapter switched off; final trainable weights to run_dir/FINAL."""
    from lorakit.train import TrainConfig, train
    from lorakit.train.distributed import is_main_process

    model = lora_llama()
    pairs = make_pairs(10, seed=7)
    cfg = TrainConfig(objective="dpo", beta=0.5, lr=1e-2, epochs=2, micro_batch_size=2, grad_accum=grad_accum,
                      schedule="constant", seed=3, progress="none", distributed="ddp", dist_timeout_s=120,
                      save_every_minutes=0)
    train(model, cfg, train_batches=lambda epoch: pair_batches(pairs, 2, epoch), run_dir=run_dir)
    if is_main_process():
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(Path(run_dir) / FINAL))


def _main() -> None:
    from lorakit.train.distributed import shutdown

    torch.set_num_threads(TEST_THREADS)
    try:
        ddp_scenario(Path(sys.argv[1]), grad_accum=2)
    finally:
        shutdown()


if __name__ == "__main__":
    _main()
