"""GRPO's tiny setups for the training tests: prompt rows, a learnable reward, a LoRA Llama, in-process runs.

Also the child process of the two-rank test:

    python -m torch.distributed.run --nproc-per-node 2 tests/grpo_fixtures.py RUN_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from _method_runs import WORDS
from _tiny import tiny_tokenizer
from conftest import tiny_llama
from train_fixtures import TEST_THREADS
from lorakit.adapters import LoRA, apply
from lorakit.data import DataConfig
from lorakit.data.prompting import PromptFormat
from lorakit.data.prompts import make_prompt_batches, tokenize_prompt_rows
from lorakit.train import TrainConfig, train
from lorakit.train.distributed import is_main_process, shutdown
from lorakit.train.grpo import Rollout
from lorakit.train.rewards import Reward

FINAL = "final_trainable.safetensors"
QUESTIONS = [{"prompt": f"Question: what is {w}?", "answer": w, "n": i} for i, w in enumerate(WORDS)]


def e_share(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A reward the tiny model can learn: the share of the completion's characters that are 'e'."""
    return [text.count("e") / len(text) if text else 0.0 for text in completions]


def prompt_table(rows=QUESTIONS, prompt=PromptFormat("prompt_completion", "{prompt}\n"), max_length: int = 32):
    """The prompts of `rows` in the format `prompt`, numbered from 0."""
    return tokenize_prompt_rows(rows, tiny_tokenizer(), DataConfig(max_length=max_length), prompt)[0]


def rollout(fn=e_share, stop_ids=frozenset({2}), rows=QUESTIONS) -> Rollout:
    """A Rollout over `rows` with the one reward `fn`, named "reward"."""
    return Rollout(tiny_tokenizer(), prompt_table(rows), [("reward", 1.0, Reward("reward", fn))], stop_ids, 0)


def tiny_lora(seed: int = 0) -> torch.nn.Module:
    """The tiny test Llama on the tiny tokenizer's vocabulary, with a lorakit LoRA on every linear layer."""
    model = tiny_llama(seed=seed, vocab_size=len(tiny_tokenizer()), max_position_embeddings=128,
                       initializer_range=0.1)  # 0.02 leaves the logits too flat for a few steps to move the samples
    torch.manual_seed(seed + 1)
    return apply(model, LoRA(r=4, alpha=8)).train()


def grpo_config(**settings) -> TrainConfig:
    """A grpo TrainConfig for the tiny runs (4 completions of at most 6 tokens, constant lr 1e-2, no checkpoints)."""
    return TrainConfig(**{**dict(objective="grpo", rewards=["exact_match"], num_generations=4,
                                 max_completion_length=6, lr=1e-2, schedule="constant", progress="none",
                                 save_every_minutes=0), **settings})


def grpo_run(run_dir, model, table: Rollout, eval_prompts=(), **settings):
    """`train` on `table`'s prompts (those in `eval_prompts` held out for evaluation) with `grpo_config(**settings)`."""
    cfg = grpo_config(**settings)
    prompts = [p for p in table.prompts if p.index not in eval_prompts]
    evals = [p for p in table.prompts if p.index in eval_prompts]
    return train(model, cfg, run_dir=run_dir, rollout=table,
                 train_batches=lambda epoch: make_prompt_batches(prompts, cfg.micro_batch_size, max_length=32, pad_id=0,
                                                                 seed=cfg.seed, epoch=epoch),
                 eval_batches=make_prompt_batches(evals, 4, max_length=32, pad_id=0, seed=0, shuffle=False) or None)


def ddp_scenario(run_dir: Path, grad_accum: int) -> None:
    """GRPO on the LoRA Llama for 2 epochs of 10 prompts (5 micro-batches of 2 prompts x 4 completions, the last
    step short), advantages over the whole step's rewards (scale_rewards batch) and a KL penalty to the adapter
    switched off; the final trainable weights to run_dir/FINAL."""
    model = tiny_lora()
    grpo_run(run_dir, model, rollout(rows=QUESTIONS[:10]), micro_batch_size=2, grad_accum=grad_accum, epochs=2,
             scale_rewards="batch", grpo_beta=0.1, seed=3, distributed="ddp", dist_timeout_s=120)
    if is_main_process():
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(Path(run_dir) / FINAL))


def _main() -> None:
    torch.set_num_threads(TEST_THREADS)
    try:
        ddp_scenario(Path(sys.argv[1]), grad_accum=1)
    finally:
        shutdown()


if __name__ == "__main__":
    _main()
