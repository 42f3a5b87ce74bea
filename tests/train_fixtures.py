"""Tiny models and hand-made batches for the training-room tests; also the child process of the
kill-and-resume test (`python tests/train_fixtures.py RUN_DIR [--resume] [--step-delay S]`).

Batches follow the data room's contract: labels already shifted (labels[b, t] is the target of
the prediction at position t), -100 where untrained, right padding with a 2-D attention_mask.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# torch threads for in-process training runs and the child processes they are compared with; the
# default 1 keeps a busy 2-core machine fast, scripts/portable-tests.sh also runs 2
TEST_THREADS = int(os.environ.get("LORAKIT_TEST_THREADS", "1"))
VOCAB = 64
PAD_ID = 0


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer Llama with hidden size 32, fp32, eager attention (dropout supported)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # imported here: the child process skips it

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         attention_dropout=dropout, initializer_range=0.1,  # 0.02 leaves logits too flat to learn fast
                         pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


class TinyLM(torch.nn.Module):
    """A non-Hugging-Face causal "LM" (no attention) whose forward returns bare logits (B, T, V)."""

    def __init__(self, seed: int = 0, hidden: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1))
        self.head = torch.nn.Linear(hidden, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)  # (B, T, C)
        return self.head(hidden + self.mlp(hidden))  # (B, T, V)


def freeze_except(model: torch.nn.Module, *keep: str) -> torch.nn.Module:
    """Freeze every parameter whose name contains none of `keep` (an adapter-like setup)."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(k in name for k in keep))
    return model


def make_examples(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12,
                  learnable: bool = False) -> list[dict[str, list[int]]]:
    """Examples with aligned (unshifted) labels: a prompt (untrained) then a completion (trained).

    Tokens are random; with `learnable` each token after the first follows from the one before
    (a fixed bigram rule), so even a few trainable matrices can bring the loss down.
    """
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        if learnable:
            for t in range(1, length):
                ids[t] = 3 + (ids[t - 1] * 7 + 5) % (VOCAB - 3)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def pad_batch(examples: list[dict[str, list[int]]], length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to `length` (default: the longest) and shift labels left by one."""
    length = length or max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, : n - 1] = torch.tensor(example["labels"][1:])  # (T-1,) target of position t is t+1
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def epoch_batches(examples: list[dict], micro_batch_size: int, epoch: int, seed: int = 0) -> list[dict]:
    """That epoch's micro-batches: a permutation seeded by (seed, epoch), then padded chunks."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    rows = [examples[i] for i in order]
    return [pad_batch(rows[i: i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]


def run_tiny(run_dir: Path, model: torch.nn.Module | None = None, examples: list[dict] | None = None,
             micro_batch_size: int = 4, eval_examples: int = 0, resume=False, on_checkpoint=None, **overrides):
    """Train a (default: adapter-like frozen) tiny Llama on fixed examples; returns (summary, model)."""
    from lorakit.train import TrainConfig, train

    model = model if model is not None else freeze_except(tiny_llama(seed=0), "q_proj", "v_proj")
    examples = examples if examples is not None else make_examples(16, seed=2)
    settings = dict(lr=1e-2, epochs=2, micro_batch_size=micro_batch_size, schedule="constant", progress="none")
    cfg = TrainConfig(**{**settings, **overrides})
    evals = [pad_batch(make_examples(eval_examples, seed=99))] if eval_examples else None
    summary = train(model, cfg, train_batches=lambda epoch: epoch_batches(examples, micro_batch_size, epoch),
                    eval_batches=evals, run_dir=run_dir, resume=resume, on_checkpoint=on_checkpoint)
    return summary, model


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    """The `key` column of a run's metrics.jsonl, in step order."""
    from lorakit.train import read_metrics

    return [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r]


def resume_scenario(run_dir: Path, resume: bool = False, step_delay: float = 0.0) -> torch.nn.Module:
    """The kill-and-resume test's run (dropout, accumulation, warmup, eval, checkpoints every 2 steps).

    It trains the small TinyLM so the child processes start without importing transformers (the
    in-process resume test covers a Hugging Face model).

    Writes the final trainable weights to run_dir/final_trainable.safetensors; returns the model.
    """
    from lorakit.train import TrainConfig, train

    model = freeze_except(TinyLM(seed=3), "mlp", "head")
    if step_delay:  # slow each forward pass so the parent can kill mid-run
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(step_delay))
    examples = make_examples(24, seed=5)
    cfg = TrainConfig(lr=1e-2, epochs=3, micro_batch_size=4, grad_accum=2, schedule="cosine", warmup_steps=2,
                      weight_decay=0.1, save_every=2, keep_checkpoints=2, eval_every=3, seed=11,
                      progress="plain", base_dropout="keep")  # keep TinyLM's dropout: resume restores the RNG
    train(model, cfg, train_batches=lambda epoch: epoch_batches(examples, 4, epoch, seed=7),
          eval_batches=[pad_batch(make_examples(6, seed=9))], run_dir=run_dir, resume=resume)
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(Path(run_dir) / "final_trainable.safetensors"))
    return model


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(TEST_THREADS)  # as the parent's in-process reference run
    resume_scenario(args.run_dir, resume=args.resume, step_delay=args.step_delay)


if __name__ == "__main__":
    _main()
