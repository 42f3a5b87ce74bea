"""Train a small byte-level BPE tokenizer offline, wrapped as a transformers tokenizer.

Useful wherever a real tokenizer is needed without a download: tests, tiny demo models.
Byte-level means every string is encodable (no unknown token).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def train_byte_bpe(texts: Iterable[str], vocab_size: int = 512, *, bos_token: str = "<s>",
                   eos_token: str = "</s>", pad_token: str = "<pad>",
                   extra_special_tokens: tuple[str, ...] = (), add_bos: bool = True,
                   chat_template: str | None = None, metaspace: bool = False) -> Any:
    """A PreTrainedTokenizerFast trained on `texts`.

    add_bos: put bos_token before every text encoded with add_special_tokens=True (as Llama
    tokenizers do). chat_template: a Jinja chat template to attach (None: no template).
    metaspace: SentencePiece-style instead of byte-level: spaces become '▁' and every encoded
    text gets a dummy prefix space (as Llama 2 tokenizers do); only characters of `texts` (and
    newline) are known then.
    """
    specials = [pad_token, bos_token, eos_token, *extra_special_tokens]
    texts = list(texts)
    backend = Tokenizer(models.BPE())
    if metaspace:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = sorted(set("".join(texts)) | {"\n", "\u2581"})
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    backend.train_from_iterator(texts, trainer)
    if add_bos:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
        additional_special_tokens=list(extra_special_tokens))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
