"""Text in, text out around the one decoding loop (decoding/decode.py): the prompt rule, stop tokens, streaming.

The one rule for turning a prompt into tokens, used by generate, compare, evaluate, chat and
`lorakit.generate` (the server renders a chat request to an adapter with its recorded format too):

    an adapter (or fine-tuned model) with a run record   the run's PromptFormat (data/prompting.py), so the
                                                         model sees the prompt tokens training used; the
                                                         end-of-turn token it learned joins the stop ids
    raw=True                                             the prompt as typed (`tokenizer(prompt)`)
    chat=True                                            the chat template: the tokenizer's, or lorakit's
                                                         built-in one when it has none (as training would)
    the base alone, or an adapter saved before records   as typed; a line says how to choose

`resolve_target` finds what to load (the base from the record, else adapter_config.json) and
`prompt_rule` picks the format; both hand back one-line explanations for the caller to print.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.adapters import load_adapter
from lorakit.adapters.modality import keep_media_rows, media_rows, modality_slots
from lorakit.adapters.multi import adapter_rows, keep_rows
from lorakit.data.media import decode_item
from lorakit.data.prompting import (RECORD_NAME, PromptFormat, RunRecord, adapter_config_base, is_model_folder,
                                    output_folder, read_record)
from lorakit.errors import LorakitError
from lorakit.media import MediaItem, placeholder
from lorakit.decoding.decode import decode
from lorakit.decoding.sampling import Sampling
from lorakit.models import fingerprint, load_model, load_tokenizer, portable_name, quiet_progress_bars

CHAT = PromptFormat("chat")  # --chat: the tokenizer's chat template, or the built-in one when it has none
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


# --- prompts and stop tokens ------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer ships a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, *, chat: bool = False, prompt_format: PromptFormat | None = None
                  ) -> list[int]:
    """Token ids of a prompt: through `prompt_format` (a run's), with `chat` as the user turn of the chat
    template plus the answer cue (the built-in template when the tokenizer has none), else as typed."""
    prompt_format = prompt_format or (CHAT if chat else None)
    if prompt_format is None:
        return list(tokenizer(prompt)["input_ids"])
    return prompt_format.prompt_ids(tokenizer, prompt)


def media_prompt_ids(model, tokenizer, prompt: str, images: Sequence[Any], *, chat: bool = False,
                     prompt_format: PromptFormat | None = None, folder: Path | None = None
                     ) -> tuple[list[int], list[MediaItem]]:
    """(token ids, items) of a prompt with images (paths, bytes, data URLs or PIL images; relative paths from
    `folder`, else the current folder) for the model's modality adapter: each `<image>` of the prompt takes its
    soft-token positions as in training; a prompt without one gets one per image in front, each on its own line
    (as a chat message's [image, text] content parts render). The prompt rule is `encode_prompt`'s."""
    if not images:
        return encode_prompt(tokenizer, prompt, chat=chat, prompt_format=prompt_format), []
    slots = modality_slots(model)
    if "image" not in slots:
        raise LorakitError("images need a modality adapter that reads them (method: modality, an image modality); "
                           "the model has none")
    mark = placeholder("image")
    if mark not in prompt:
        prompt = "\n".join([mark] * len(images) + [prompt])
    if prompt.count(mark) != len(images):
        raise LorakitError(f"the prompt has {prompt.count(mark)} {mark} placeholders but {len(images)} images "
                           "were given")
    prompt_format = prompt_format or (CHAT if chat else PromptFormat("text"))  # "text": the prompt as typed
    ids, spans = prompt_format.media_ids(tokenizer, [{"role": "user", "content": prompt}], {"image": slots["image"]})
    items = [(modality, start, decode_item(source, slots[modality], folder or Path.cwd(), f"image {index + 1}"))
             for index, ((modality, start), source) in enumerate(zip(spans, images))]
    return ids, items


def stop_token_ids(tokenizer, model=None, formats: Sequence[PromptFormat | None] = ()) -> set[int]:
    """End-of-sequence and end-of-turn ids: the tokenizer's EOS, the model's generation config, chat markers,
    and the end-of-turn token each of `formats` trained the model to emit."""
    ids: set[int] = set()
    eos_sources = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in eos_sources:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    for prompt_format in {f for f in formats if f is not None}:
        ids |= prompt_format.stop_ids(tokenizer)
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


# --- decoding ---------------------------------------------------------------------------------------

def greedy_ids(model, tokenizer, ids: Sequence[list[int]], *, stops: set[int], max_new_tokens: int = 16,
               batch_size: int = 32, media: Sequence[Sequence[MediaItem] | None] | None = None) -> list[str]:
    """Complete token-id prompts greedily, `batch_size` at a time; the new text of each, special tokens removed.
    `media`: each prompt's items for the model's modality adapter (`generate_ids`)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(ids), batch_size):
            chunk = list(ids[start:start + batch_size])
            held = list(media[start:start + batch_size]) if media is not None else [None] * len(chunk)
            with media_rows(model, held):
                new = decode(model, chunk, [Sampling()] * len(chunk), max_new_tokens=[max_new_tokens] * len(chunk),
                             stop_ids=stops, pad_id=pad, on_shrink=lambda kept: keep_media_rows(model, kept))
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Complete each prompt as typed, greedily; a row stops at the tokenizer's EOS or after `max_new_tokens`."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return greedy_ids(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], stops=stops,
                      max_new_tokens=max_new_tokens, batch_size=batch_size)


def generate_ids(model, tokenizer, ids: Sequence[list[int]], *, stops: set[int], sampling=None,
                 max_new_tokens: int = 64, adapters: Sequence[str | None] | None = None, seed: int | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 media: Sequence[Sequence[MediaItem] | None] | None = None) -> list[str]:
    """Complete token-id prompts in one batch; the new text of each.

    `adapters` names a loaded named adapter (or None: the base) per prompt (lorakit.adapters.multi); `seed`
    makes sampling repeatable per prompt; `on_text(row, piece)` receives the text as it is generated; `media`
    gives each prompt's items (`media_prompt_ids`) for the model's modality adapter (lorakit.adapters.modality).
    """
    streams = [TextStream(tokenizer) for _ in ids]

    def on_token(row: int, token: int) -> None:
        if piece := streams[row].push(token):
            on_text(row, piece)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with adapter_rows(model, list(adapters) if adapters is not None else [None] * len(ids)), \
                media_rows(model, list(media) if media is not None else [None] * len(ids)):
            new = decode(model, list(ids), [sampling or Sampling()] * len(ids),
                         max_new_tokens=[max_new_tokens] * len(ids), stop_ids=stops, pad_id=pad,
                         seeds=[seed] * len(ids), on_token=on_token if on_text else None,
                         on_shrink=lambda kept: (keep_rows(model, kept), keep_media_rows(model, kept)))
    finally:
        model.train(was_training)
    for row, stream in enumerate(streams if on_text else []):
        if piece := stream.flush():
            on_text(row, piece)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]


def generate_texts(model, tokenizer, prompts: Sequence[str], *, sampling=None, max_new_tokens: int = 64,
                   chat: bool = False, prompt_format: PromptFormat | Sequence[PromptFormat | None] | None = None,
                   adapters: Sequence[str | None] | None = None, seed: int | None = None,
                   on_text: Callable[[int, str], None] | None = None,
                   images: Sequence[Sequence[Any]] | None = None) -> list[str]:
    """Complete every prompt in one batch; return the new text of each.

    Prompts go through `prompt_format` (one for all, or one per prompt), or the chat template with
    `chat`, else as typed (`encode_prompt`). `images` gives each prompt's images for the model's modality
    adapter (`media_prompt_ids`: placeholders, sources). The rest is `generate_ids`.
    """
    if isinstance(prompt_format, (list, tuple)):
        if len(prompt_format) != len(prompts):
            raise ValueError(f"{len(prompt_format)} prompt formats for {len(prompts)} prompts")
        formats = list(prompt_format)
    else:
        formats = [prompt_format or (CHAT if chat else None)] * len(prompts)
    if images is not None:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        encoded = [media_prompt_ids(model, tokenizer, p, list(found), prompt_format=f)
                   for p, f, found in zip(prompts, formats, images)]
        ids, media = [found_ids for found_ids, _ in encoded], [items for _, items in encoded]
    else:
        ids, media = [encode_prompt(tokenizer, p, prompt_format=f) for p, f in zip(prompts, formats)], None
    return generate_ids(model, tokenizer, ids, stops=stop_token_ids(tokenizer, model, formats), sampling=sampling,
                        max_new_tokens=max_new_tokens, adapters=adapters, seed=seed, on_text=on_text, media=media)


# --- what to load, and the prompt rule ----------------------------------------------------------------

@dataclass
class Target:
    """What inference loads and what it knows of the run behind it (from `resolve_target`)."""

    model: str  # the base model to load, or a full fine-tuning model folder (the model itself)
    revision: str | None = None
    adapter: Path | None = None  # an adapter folder to put on the model
    record: RunRecord | None = None  # the run record of the adapter or fine-tuned model folder
    source: str | None = None  # the adapter or model folder the record belongs to (for messages)
    notes: list[str] = field(default_factory=list)  # implicit choices, one line each, to print once


def resolve_target(adapter: str | Path | None = None, model: str | None = None) -> Target:
    """What to load for `adapter` (an adapter, fine-tuned model or run folder) on `model` (default: the base the
    adapter's record names, else its adapter_config.json, else the embedded model)."""
    if adapter is None:  # the base alone, or a fine-tuned model folder (with its record) given as the model
        folder = output_folder(model) if model is not None else None
        record = read_record(folder) if folder is not None and folder.is_dir() else None
        return Target(str(folder) if record else model or "embedded", record=record,
                      source=str(folder) if record else None)
    folder = output_folder(adapter)
    if not folder.is_dir():
        raise LorakitError(f"adapter folder {adapter} does not exist")
    record = read_record(folder)
    if is_model_folder(folder):
        if model is not None:
            raise LorakitError(f"{folder} holds a whole fine-tuned model, not an adapter; load it alone "
                               f"(--model {folder}) instead of on --model {model}")
        return Target(str(folder), adapter=None, record=record, source=str(folder),
                      notes=[f"model: {folder} (a whole fine-tuned model, loaded as the model)"])
    if model is not None:
        notes = [f"base model: {model} (--model; the adapter was trained on {record.base_model})"
                 ] if record is not None and portable_name(model) != record.base_model else []
        return Target(model, adapter=folder, record=record, source=str(folder), notes=notes)
    if record is not None:
        return Target(record.base_model, record.revision, folder, record, str(folder),
                      [f"base model: {record.base_model} (recorded with the adapter; --model to choose another)"])
    base = adapter_config_base(folder)
    return Target(base, None, folder, None, str(folder),
                  [f"base model: {base} (the adapter's adapter_config.json; --model to choose another)"])


def base_warning(target: Target, record: RunRecord | None = None) -> str | None:
    """One line when the base being loaded is not the one the run trained on (fingerprints differ)."""
    record = record or target.record
    if record is None or record.fingerprint is None:
        return None
    if target.adapter is None and target.record is record:
        return None  # a whole fine-tuned model folder: its weights are its own, not the recorded base's
    loaded = fingerprint(target.model)
    if loaded is None or loaded.get("sha256") == record.fingerprint.get("sha256"):
        return None
    return (f"warning: the adapter was trained on {record.base_model} (weights fingerprint "
            f"{record.fingerprint.get('sha256', '?')[:12]}), but the base loaded, {target.model}, has fingerprint "
            f"{loaded['sha256'][:12]}: its answers may not be what training produced")


def chat_words(tokenizer) -> str:
    """How --chat renders prompts with this tokenizer, in words."""
    if has_chat_template(tokenizer):
        return "chat, the tokenizer's chat template"
    return "chat, lorakit's built-in chat template (the tokenizer has none)"


def prompt_rule(target: Target | RunRecord | None, tokenizer, *, raw: bool = False, chat: bool = False,
                source: str | None = None) -> tuple[PromptFormat | None, str]:
    """(the prompt format, or None for prompts as typed; the one line that says which and why)."""
    if raw and chat:
        raise LorakitError("--raw and --chat exclude each other: --raw sends prompts as typed, --chat wraps "
                           "them in the chat template")
    record, source = (target.record, target.source) if isinstance(target, Target) else (target, source)
    if chat:
        return CHAT, f"prompt format: {chat_words(tokenizer)} (--chat)"
    if raw:
        trained = f"; the run used {record.prompt.describe(tokenizer)}" if record else ""
        return None, f"prompt format: none, prompts go as typed (--raw{trained})"
    if record is not None:
        return record.prompt, (f"prompt format: {record.prompt.describe(tokenizer)} (recorded with {source}; "
                               "--raw sends prompts as typed)")
    if source is not None:
        return None, (f"prompt format: none, prompts go as typed: {source} has no {RECORD_NAME} (saved before "
                      "lorakit recorded prompt formats); pass --chat if it was trained on chat rows")
    return None, "prompt format: none, prompts go as typed (no adapter; --chat applies the chat template)"


def load_target(target: Target, *, dtype: str | None = None, device: str | None = None,
                trust_remote_code: bool = False, log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """(model with the adapter on it, tokenizer) for `target`; prints its notes and any base warning."""
    quiet_progress_bars()
    for line in [*target.notes, base_warning(target)]:
        if line:
            log(line)
    model = load_model(target.model, dtype=dtype, device=device, revision=target.revision,
                       trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(target.model, revision=target.revision, trust_remote_code=trust_remote_code)
    if target.adapter is not None:
        model = load_adapter(model, target.adapter)
    return model.eval(), tokenizer


def generate(prompts: str | Sequence[str], adapter: str | Path | None = None, model: str | None = None, *,
             raw: bool = False, chat: bool = False, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = 0,
             dtype: str | None = None, device: str | None = None, images: Sequence[Any] = (),
             log: Callable[[str], None] = print) -> list[str]:
    """Answers to `prompts` from `model` (default: the adapter's recorded base, else the embedded model) with
    `adapter` (an adapter, fine-tuned model or run folder), prompts rendered by the rule of this module:

        lorakit.generate("What is the capital of Peru?", adapter="runs/pirate/adapter")
        lorakit.generate("Which country's flag is this?", adapter="runs/flags", images=["flag.png"])

    `images` go with every prompt, to a modality adapter (`media_prompt_ids`).

    Greedy unless `temperature` > 0. The choices made (base, prompt format) are passed to `log` once.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    target = resolve_target(adapter, model)
    loaded, tokenizer = load_target(target, dtype=dtype, device=device, log=log)
    prompt_format, line = prompt_rule(target, tokenizer, raw=raw, chat=chat)
    log(line)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    return generate_texts(loaded, tokenizer, prompts, sampling=sampling, max_new_tokens=max_new_tokens,
                          prompt_format=prompt_format, seed=seed,
                          images=[list(images)] * len(prompts) if images else None)
