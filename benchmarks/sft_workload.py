"""The one SFT job both pipelines run: sizes, a synthetic dataset, a tokenizer and a base model.

Everything here is deterministic for a given (size, seed), so the two child processes of the
benchmark build bit-identical base weights, the same rows and the same tokenizer, and only the
training pipeline differs.

The dataset is prompt/completion rows of pseudo-words whose lengths follow a log-normal
distribution (many short rows, a long tail), as real instruction data does; this is what makes
padding to the longest row of a batch expensive. The completion repeats the prompt's words in
reverse, so there is something to learn and the loss falls.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Size:
    """Model shape and batch geometry of one benchmark size."""

    vocab: int  # model vocabulary (the tokenizer is trained to this size)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    max_length: int  # longest example in tokens; packed rows are this long
    micro_batch: int  # rows per forward/backward pass of the Trainer pipeline
    grad_accum: int  # micro-batches per optimizer step, both pipelines
    prompt_words: int  # median prompt length in words
    completion_words: int  # median completion length in words
    kv_heads: int | None = None  # grouped-query attention; None = as many as heads
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix
    model_vocab: int | None = None  # model vocabulary when larger than the tokenizer's (ids stay < vocab)
    min_length: int = 1  # shortest example in tokens (rows outside [min_length, max_length] are skipped)
    pack_length: int | None = None  # lorakit's packed row length; None = max_length


SIZES: dict[str, Size] = {
    "tiny": Size(vocab=1024, hidden=64, intermediate=128, layers=2, heads=4, max_length=128,
                 micro_batch=4, grad_accum=2, prompt_words=12, completion_words=8),
    "small": Size(vocab=4096, hidden=256, intermediate=688, layers=4, heads=4, max_length=512,
                  micro_batch=8, grad_accum=2, prompt_words=40, completion_words=30),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), random weights; examples 64-256 tokens,
    # effective batch 8 (8 examples x 1 micro-batch for the padded pipelines)
    "smollm": Size(vocab=4096, hidden=576, intermediate=1536, layers=30, heads=9, max_length=256,
                   micro_batch=8, grad_accum=1, prompt_words=45, completion_words=35, kv_heads=3,
                   tie_embeddings=True, model_vocab=49152, min_length=64, pack_length=512),
    # the same geometry on a 4-layer, narrow model: for developing and the smoke test
    "smollm-dev": Size(vocab=4096, hidden=192, intermediate=512, layers=4, heads=3, max_length=256,
                       micro_batch=8, grad_accum=1, prompt_words=45, completion_words=35, kv_heads=1,
                       tie_embeddings=True, model_vocab=49152, min_length=64, pack_length=512),
}

# The LoRA recipe shared by both pipelines (peft's LoraConfig and lorakit's LoRA take the same values).
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]}
LENGTH_SIGMA = 0.8  # log-normal spread of row lengths (in words)
PROMPT_TEMPLATE = "{prompt}\n"  # prompt, newline, completion: the layout both pipelines tokenize


def pseudo_words(count: int, rng: random.Random) -> list[str]:
    """`count` distinct pronounceable words built from syllables."""
    consonants, vowels = "bdfghklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def _length(median: int, rng: random.Random) -> int:
    return max(2, int(round(math.exp(rng.gauss(math.log(median), LENGTH_SIGMA)))))


def make_rows(n_rows: int, size: Size, seed: int) -> list[dict[str, str]]:
    """Prompt/completion rows with log-normal lengths; Zipf-distributed word frequencies."""
    rng = random.Random(f"bench-rows:{seed}")
    words = pseudo_words(2000, rng)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words are common
    rows = []
    for i in range(n_rows):
        prompt = rng.choices(words, weights, k=_length(size.prompt_words, rng))
        answer = list(reversed(prompt))[: _length(size.completion_words, rng)]
        rows.append({"prompt": f"Reverse {i}: " + " ".join(prompt), "completion": " ".join(answer) + "."})
    return rows


def make_tokenizer(size: Size, seed: int) -> Any:
    """A byte-level BPE tokenizer (lorakit's offline trainer) fitted to the benchmark's text."""
    from lorakit.data import train_byte_bpe

    texts = [PROMPT_TEMPLATE.format(prompt=r["prompt"]) + r["completion"] for r in make_rows(2000, size, seed + 1)]
    return train_byte_bpe(texts, vocab_size=size.vocab)


def fits(row: dict[str, str], tokenizer: Any, max_length: int) -> bool:
    """True when the whole example (BOS, prompt, completion, EOS) fits in max_length tokens."""
    prompt = tokenizer(PROMPT_TEMPLATE.format(prompt=row["prompt"]))["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    return len(prompt) + len(completion) + 1 <= max_length


def example_length(row: dict[str, str], tokenizer: Any) -> int:
    """Tokens of the whole example: BOS, prompt, completion, EOS."""
    prompt = tokenizer(PROMPT_TEMPLATE.format(prompt=row["prompt"]))["input_ids"]
    return len(prompt) + len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1


def workload_rows(n_rows: int, size: Size, tokenizer: Any, seed: int) -> list[dict[str, str]]:
    """Exactly `n_rows` rows of min_length..max_length tokens, untruncated (both pipelines see whole examples)."""
    candidates = make_rows(4 * n_rows + 16, size, seed)
    rows = [row for row in candidates
            if size.min_length <= example_length(row, tokenizer) <= size.max_length][:n_rows]
    if len(rows) < n_rows:
        raise RuntimeError(f"only {len(rows)} of {n_rows} generated rows fit max_length={size.max_length}")
    return rows


def build_model(size: Size, seed: int, tokenizer: Any) -> Any:
    """A randomly initialised Llama built from a config (no download), fp32, seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.model_vocab or size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads or size.heads,
        max_position_embeddings=max(size.max_length, size.pack_length or 0), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=size.tie_embeddings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def examples_digest(examples: list[dict[str, list[int]]]) -> str:
    """A short hash of (input_ids, aligned labels) of every example, in order."""
    payload = json.dumps([[ex["input_ids"], ex["labels"]] for ex in examples], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def describe(size_name: str) -> dict[str, Any]:
    """The size and LoRA recipe as plain values (for the JSON result)."""
    return {"size": size_name, **asdict(SIZES[size_name]), "lora": LORA}
