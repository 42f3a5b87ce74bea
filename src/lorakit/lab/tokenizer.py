"""Train the embedded model's tokenizer: a small byte-level BPE, saved as a transformers tokenizer.

Byte-level means every string can be encoded (no unknown token), so users can feed the embedded
model any text, even though its vocabulary was learned from country facts alone.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# A chat template in the same "Question: ...\nAnswer: ..." shape as the embedded SFT data, so
# chat-formatted rows and prompt/completion rows teach the model one format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    # the space before the answer sits inside the trained span, as in the prompt/completion rows
    # (" Africa"); the newline is an expression because transformers renders with trim_blocks,
    # which would eat a literal newline right after {% endgeneration %}
    "{% elif message['role'] == 'assistant' %}Answer:{% generation %} {{ message['content'] }}"
    "{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens (special tokens included)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around `tokenizer`, with eos/bos/pad tokens and a chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it for transformers."""
    return wrap(train_bpe(texts, vocab_size), model_max_length)
