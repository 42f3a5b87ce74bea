"""A tokenizer as GGUF metadata, so llama.cpp tokenizes and detokenizes as transformers does.

Byte-level BPE tokenizers (GPT-2's scheme: the embedded model's, SmolLM's, Llama 3's, the tests') are written
as llama.cpp's "gpt2" tokenizer model: every token string in byte-level form, its type (normal, control
for special added tokens, user-defined for other added tokens, unused for ids the tokenizer lacks), the
merges in rank order, the special ids and whether a BOS/EOS is added. llama.cpp does not run the
tokenizer.json pre-tokenizer; it picks one of its own by name (tokenizer.ggml.pre), so the pre-tokenizer is
recognised here from its definition and refused when it is not one llama.cpp has.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Split-then-ByteLevel pre-tokenizers: the split regex -> llama.cpp's pre-tokenizer name for it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


# transformers' {% generation %} ... {% endgeneration %} marks the assistant's tokens for training masks; other Jinja
# engines (llama.cpp's, llama-cpp-python's, Ollama's) do not know the tag. An always-true `if` renders the same text
# and keeps any whitespace control (-) of the tags.
GENERATION_TAG = re.compile(r"{%(-?)\s*(end)?generation\s*(-?)%}")


def portable_chat_template(template: str) -> str:
    """`template` without transformers' generation tags (the same rendered text)."""
    return GENERATION_TAG.sub(lambda m: f"{{%{m[1]} {'endif' if m[2] else 'if true'} {m[3]}%}}", template)


class UnsupportedTokenizer(LorakitError):
    """A tokenizer llama.cpp could not reproduce from GGUF metadata."""


@dataclass
class GGUFVocab:
    """What the GGUF file says about the tokenizer (the tokenizer.ggml.* keys)."""

    pre: str  # llama.cpp's pre-tokenizer name ("gpt-2", "llama-bpe", ...)
    tokens: list[str]  # one per id, 0 .. vocab_size-1
    types: list[int]
    merges: list[str]  # "left right", highest priority first
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def tokenizer_json(tokenizer: Any) -> dict:
    """The tokenizer's tokenizer.json definition (a fast tokenizer's backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(f"GGUF export needs a fast tokenizer (tokenizer.json); "
                                   f"{type(tokenizer).__name__} has none")
    return json.loads(backend.to_str())


def is_gpt2_byte_level(spec: dict) -> bool:
    """A ByteLevel pre-tokenizer that splits with GPT-2's regex and adds no prefix space."""
    return spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space")


def pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: GPT-2's ByteLevel regex (alone or after single digits),
    or a Split regex it knows (Llama 3's, Qwen2's) before a plain ByteLevel."""
    spec = spec or {}
    if is_gpt2_byte_level(spec):
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and is_gpt2_byte_level(steps[1])):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM's)
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        name = SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise UnsupportedTokenizer(f"GGUF export supports byte-level BPE tokenizers with GPT-2's, SmolLM's, Llama 3's or "
                               f"Qwen2's pre-tokenizer; this tokenizer's is {json.dumps(spec)[:200]}")


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer` for a model with `vocab_size` embedding rows."""
    spec = tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise UnsupportedTokenizer(f"GGUF export supports byte-level BPE tokenizers without a normalizer; this one "
                                   f"is {model.get('type')} (byte_fallback {model.get('byte_fallback')}, normalizer "
                                   f"{(spec.get('normalizer') or {}).get('type')})")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    strings: dict[int, tuple[str, int]] = {index: (token, NORMAL) for token, index in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        strings[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if strings and max(strings) >= vocab_size:
        raise UnsupportedTokenizer(f"the tokenizer has id {max(strings)}, but the model has only {vocab_size} "
                                   "embedding rows")
    tokens = [strings.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model.get("merges", [])]
    probe = list(tokenizer("a")["input_ids"])
    special = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad", "unk")}
    special = {kind: int(index) for kind, index in special.items() if index is not None}
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(pre, [t for t, _ in tokens], [k for _, k in tokens], merges, special,
                     add_bos="bos" in special and len(probe) > 1 and probe[0] == special["bos"],
                     add_eos="eos" in special and len(probe) > 1 and probe[-1] == special["eos"],
                     chat_template=portable_chat_template(template) if isinstance(template, str) else None)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """The tokenizer.ggml.* keys of `vocab` on a gguf.GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, index in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
