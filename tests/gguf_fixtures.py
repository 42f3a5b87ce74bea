"""Models and adapters for the GGUF export tests (test_export_gguf.py, and test_gguf_llamacpp.py's llama.cpp check).

An adapter whose B is random and nonzero, so the merged model differs from the base (a fresh LoRA's B is zero);
the tiny Llama is saved with its byte-level BPE tokenizer (BOS added, as Llama's) and has grouped-query attention,
an untied output head and weights large enough for clear greedy choices.
"""
from __future__ import annotations

from pathlib import Path

import torch
from _tiny import CORPUS, tiny_tokenizer
from conftest import tiny_llama
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorakit.adapters import LoRA, apply, save_adapter
from lorakit.export.vocab import LLAMA3_SPLIT
from lorakit.models import load_model

PROMPTS = ["Question: What is the capital of Peru?\nAnswer:", "The quick brown fox", "Hello world. In 2024, 12345 it's"]


def random_lora(model, *, seed: int = 0, r: int = 4, alpha: float = 8.0, rslora: bool = False,
                targets: str = "all-linear", scale: float = 0.05):
    """`model` with a LoRA on `targets` whose A and B are random (seeded), so it changes the model."""
    torch.manual_seed(seed)  # A's init
    apply(model, LoRA(r=r, alpha=alpha, rslora=rslora, targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def embedded_adapter(folder: Path, **lora) -> Path:
    """An adapter folder on the embedded model (random nonzero B), its base recorded as 'embedded'."""
    save_adapter(random_lora(load_model("embedded", dtype="float32"), **lora), folder, "embedded")
    return folder


PRE_TOKENIZERS = {  # tokenizer.json pre-tokenizers of well-known byte-level BPE tokenizers, by llama.cpp's name
    "llama-bpe": lambda: pre_tokenizers.Sequence([  # Llama 3: its regex (digits in groups of up to three), then bytes
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "smollm": lambda: pre_tokenizers.Sequence([  # SmolLM: every digit alone, then GPT-2's regex and bytes
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}


def styled_tokenizer(pre: str):
    """A byte-level BPE with the pre-tokenizer llama.cpp calls `pre` (PRE_TOKENIZERS), trained on the test corpus;
    no BOS added."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|begin_of_text|>", "<|eot_id|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS + ["In 2024, 12345 apples cost 678 coins."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<pad>")


def tiny_llama_folder(folder: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A tiny Llama (GQA: 4 query heads, 2 key/value heads) with `tokenizer` (default: the test BPE tokenizer),
    saved as a model folder."""
    tokenizer = tokenizer or tiny_tokenizer()
    settings = dict(vocab_size=len(tokenizer), initializer_range=0.3, max_position_embeddings=128,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    model = tiny_llama(seed, **{**settings, **overrides})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama_adapter(model_folder: Path, folder: Path, **lora) -> Path:
    """An adapter folder (random nonzero B) on the tiny Llama saved at `model_folder`."""
    save_adapter(random_lora(load_model(model_folder, dtype="float32"), **lora), folder, str(model_folder))
    return folder
