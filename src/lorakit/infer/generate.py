"""Text in, text out around the one decoding loop (infer/decode.py): prompts, stop tokens, streaming."""
from __future__ import annotations

from collections.abc import Sequence

from lorakit.adapters.multi import adapter_rows, keep_rows
from lorakit.infer.decode import decode
from lorakit.infer.sampling import Sampling


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Complete each prompt greedily (no chat template); return only the new text, special tokens removed.

    The one decoding loop (`decode`), `batch_size` prompts at a time; a row stops at the
    tokenizer's end-of-sequence token or after `max_new_tokens`.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    ids = [encode_prompt(tokenizer, prompt, chat=False) for prompt in prompts]
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            new = decode(model, chunk, [Sampling()] * len(chunk), max_new_tokens=[max_new_tokens] * len(chunk),
                         stop_ids=stops, pad_id=pad)
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


# --- prompts, stop tokens, streaming and the general decoding entry point -------------------------

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer ships a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of a prompt; with `chat`, as the user turn of the chat template plus the answer cue."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template places BOS itself


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """End-of-sequence and end-of-turn ids: the tokenizer's EOS, the model's generation config, chat markers."""
    ids: set[int] = set()
    eos_sources = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in eos_sources:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


class TextStream:
    """Incremental detokenisation: feed token ids, get back only the new text.

    Text is decoded from all tokens so far (so merges across tokens come out right) and held back
    while it ends in an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is shown as \ufffd)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def generate_texts(model, tokenizer, prompts: Sequence[str], *, sampling=None, max_new_tokens: int = 64,
                   chat: bool | None = None, adapters: Sequence[str | None] | None = None, seed: int | None = None,
                   on_text=None) -> list[str]:
    """Complete every prompt in one batch; return the new text of each.

    `chat=None` applies the chat template when the tokenizer has one. `adapters` names a loaded
    named adapter (or None: the base) per prompt (lorakit.adapters.multi); `seed` makes sampling
    repeatable per prompt; `on_text(row, piece)` receives the text as it is generated.
    """
    chat = has_chat_template(tokenizer) if chat is None else chat
    ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    streams = [TextStream(tokenizer) for _ in prompts]

    def on_token(row: int, token: int) -> None:
        piece = streams[row].push(token)
        if piece:
            on_text(row, piece)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with adapter_rows(model, list(adapters) if adapters is not None else [None] * len(prompts)):
            new = decode(model, ids, [sampling or Sampling()] * len(prompts),
                         max_new_tokens=[max_new_tokens] * len(prompts), stop_ids=stop_token_ids(tokenizer, model),
                         pad_id=pad, seeds=[seed] * len(prompts), on_token=on_token if on_text else None,
                         on_shrink=lambda kept: keep_rows(model, kept))
    finally:
        model.train(was_training)
    for row, stream in enumerate(streams if on_text else []):
        if piece := stream.flush():
            on_text(row, piece)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]
