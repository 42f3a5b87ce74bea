"""Offline tokenizers for the data tests: a small byte-level BPE trained in milliseconds."""
from __future__ import annotations

from functools import lru_cache

from lorakit.data import train_byte_bpe

CORPUS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "I want you to act as a Linux terminal. Reply with the terminal output only.",
    "Below is an instruction that describes a task. Write a response.",
] * 8

# ChatML, the layout of Qwen's and many other tokenizers' templates
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@lru_cache(maxsize=None)
def tiny_tokenizer(chat_template: str | None = None, add_bos: bool = True):
    """BPE tokenizer with <pad>=0, <s>=1, </s>=2, ChatML specials; BOS added like Llama's."""
    return train_byte_bpe(CORPUS, vocab_size=320, extra_special_tokens=("<|im_start|>", "<|im_end|>"),
                          add_bos=add_bos, chat_template=chat_template)


@lru_cache(maxsize=None)
def tiny_sp_tokenizer():
    """SentencePiece-style (metaspace) BPE: a dummy prefix space before every encoded text."""
    return train_byte_bpe(CORPUS, vocab_size=200, metaspace=True)
