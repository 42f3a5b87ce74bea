"""The distributed tests' runs, and their child process under torchrun:

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_fixtures.py JOBS_JSON

JOBS_JSON is a list of {"run_dir", "method", "grad_accum", "resume", "distributed", "step_delay"};
the jobs run one after another in the same process group. `scenario` is also what the tests run
in a single process, so both sides train the very same model, data and schedule.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from train_fixtures import TEST_THREADS, epoch_batches, freeze_except, make_examples, tiny_llama

FINAL = "final_trainable.safetensors"
MICRO_BATCH = 2
EXAMPLES = 22  # 11 micro-batches per epoch: the last step of an epoch is short (3 of 4 micro-batches)


def build_model(method: str) -> torch.nn.Module:
    """The tiny Llama with LoRA-like trainable projections ("adapter") or everything trainable ("full")."""
    model = tiny_llama(seed=0)
    return freeze_except(model, "q_proj", "v_proj") if method == "adapter" else model


def final_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable weights (gathered from the shards under FSDP2); complete on rank 0."""
    from torch.distributed.tensor import DTensor

    from lorakit.train import distributed

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    parallel = distributed.FSDP() if sharded else distributed.Parallel()
    return parallel.trainable_state(model)


def scenario(run_dir: Path, *, method: str = "adapter", grad_accum: int = 2, resume=False,
             distributed: str = "auto", step_delay: float = 0.0, dist_timeout_s: float = 600.0):
    """Train 2 epochs (6 optimizer steps of 4 micro-batches of 2 rows), checkpoint every 2 steps, and
    write the final trainable weights to run_dir/final_trainable.safetensors. Returns the summary."""
    from lorakit.train import TrainConfig, train
    from lorakit.train.distributed import is_main_process

    model = build_model(method)
    if step_delay:  # slow every forward pass so that a test can kill a rank mid-run
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(step_delay))
    examples = make_examples(EXAMPLES, seed=3, learnable=True)
    cfg = TrainConfig(lr=1e-2, epochs=2, micro_batch_size=MICRO_BATCH, grad_accum=grad_accum, schedule="cosine",
                      warmup_steps=1, weight_decay=0.1, save_every=2, keep_checkpoints=0, seed=4, progress="plain",
                      distributed=distributed, dist_timeout_s=dist_timeout_s)
    summary = train(model, cfg, train_batches=lambda epoch: epoch_batches(examples, MICRO_BATCH, epoch, seed=1),
                    run_dir=run_dir, resume=resume)
    weights = final_weights(model)
    if is_main_process():
        save_file(weights, str(Path(run_dir) / FINAL))
    return summary


def _main() -> None:
    from lorakit.train.distributed import shutdown

    torch.set_num_threads(TEST_THREADS)
    try:
        for job in json.loads(sys.argv[1]):
            scenario(Path(job.pop("run_dir")), **job)
    finally:
        shutdown()


if __name__ == "__main__":
    _main()
