"""Preference rows: one prompt and two answers, chosen and rejected, as text segments for each side.

The rows users have (after data.columns), as TRL's preference datasets are:

    prompt + chosen + rejected, all text   the prompt goes through data.prompt_template (untrained); each
                                           answer and the EOS after it are trained, as prompt_completion's
    prompt + chosen + rejected, as chat    prompt: a list of messages, or a string (one user message);
                                           chosen, rejected: a list of assistant messages, or a string (one)
    chosen + rejected (implicit prompt)    whole conversations (or texts) that share a beginning: their
                                           longest common prefix of messages is the prompt, and only the
                                           final assistant answer may differ. Texts split where they first
                                           differ, moved back to the start of that word (its space goes
                                           with the answer, as in " Paris").

Both sides render the same prompt segments, and the tokenizer step encodes segment by segment, so
both sides get the very same prompt ids: the boundary is exact on each side, as for SFT rows.
A chat row is rendered by the SFT chat renderer (data/chat.py: its template choice and role checks);
the assistant turns inside the prompt are context here, not trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.data.chat import _message, _renderer, chat_template_for, render_chat
from lorakit.data.rows import Rendered, RowError

if TYPE_CHECKING:
    from lorakit.data.config import DataConfig

SIDES = ("chosen", "rejected")
Segments = list[tuple[str, bool]]


@dataclass
class RenderedPair:
    """One preference row as text segments: a prompt both sides share, then each side's answer."""

    prompt: Segments  # never trained
    chosen: Segments
    rejected: Segments
    add_bos: bool = True  # as Rendered's
    add_eos: bool = True
    chat: bool = False  # rendered through a chat template (else the prompt_completion layout)

    def prompt_only(self) -> Rendered:
        """The shared prompt alone, as the tokenizer step takes it."""
        return Rendered(list(self.prompt), add_bos=self.add_bos, add_eos=False)

    def side(self, name: str) -> Rendered:
        """The prompt followed by one side's answer ('chosen' or 'rejected')."""
        return Rendered([*self.prompt, *getattr(self, name)], add_bos=self.add_bos, add_eos=self.add_eos)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(row: dict[str, Any], name: str) -> str | list:
    """A prompt/chosen/rejected value: a non-empty string or a non-empty list (of messages)."""
    value = row.get(name)
    if value is None:
        raise RowError(f"field {name!r} is missing (columns: {', '.join(row) if row else 'none'})")
    if isinstance(value, str):
        if name != "prompt" and not value.strip():
            raise RowError(f"field {name!r} is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise RowError(f"field {name!r} is an empty list")
        return value
    raise RowError(f"field {name!r} must be a string or a list of messages, got {type(value).__name__} "
                   f"{_shown(value)}")


def _messages(value: str | list, name: str, default_role: str) -> list[dict[str, str]]:
    """A field as {role, content} messages (a string is one message of `default_role`), roles checked."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return [_message(item, f"{name}[{j}]") for j, item in enumerate(value)]


def _answer_messages(value: str | list, name: str) -> list[dict[str, str]]:
    messages = _messages(value, name, "assistant")
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            raise RowError(f"{name}[{j}] is a {message['role']} message; {name} holds the answer: assistant "
                           "messages only (the conversation before it goes in 'prompt')")
    return messages


# -- the implicit prompt -------------------------------------------------------------------------------------

def _split_texts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two texts that share a beginning."""
    if chosen == rejected:
        raise RowError("fields 'chosen' and 'rejected' are the same text: no prompt to split off, nothing to prefer")
    cut = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    while cut > 0 and not chosen[cut - 1].isspace():  # back to the start of the word where they differ
        cut -= 1
    if cut > 0 and chosen[cut - 1] == " ":  # the space before the answer goes with it: " Paris"
        cut -= 1
    if cut == 0:
        raise RowError("fields 'chosen' and 'rejected' share no prefix to take as the prompt (no 'prompt' "
                       "column: the prompt is the text both begin with); add a 'prompt' column")
    for name, text in zip(SIDES, (chosen, rejected)):
        if not text[cut:].strip():
            raise RowError(f"field {name!r} has no answer after the prompt it shares with the other side")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_conversations(chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen answer, rejected answer) messages of two conversations that share a beginning."""
    sides = [_messages(chosen, "chosen", "assistant"), _messages(rejected, "rejected", "assistant")]
    shared = 0
    while shared < min(map(len, sides)) and sides[0][shared] == sides[1][shared]:
        shared += 1
    if shared == 0:
        raise RowError("fields 'chosen' and 'rejected' share no prefix: with no 'prompt' column the prompt is "
                       "the messages both conversations begin with, and their first messages differ")
    if sides[0] == sides[1]:
        raise RowError("fields 'chosen' and 'rejected' are the same conversation: nothing to prefer")
    for name, messages in zip(SIDES, sides):
        if shared == len(messages):
            raise RowError(f"field {name!r} has no answer after the prompt it shares with the other side (it ends "
                           "where the other goes on)")
        for j in range(shared, len(messages)):
            if messages[j]["role"] != "assistant":
                raise RowError(f"fields 'chosen' and 'rejected' differ before the last assistant turn: after "
                               f"their {shared} shared messages, {name}[{j}] is a {messages[j]['role']} message "
                               "(only the final assistant answer may differ)")
    return sides[0][:shared], sides[0][shared:], sides[1][shared:]


def explicit_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its prompt spelled out: rows without a 'prompt' field get the shared beginning of
    chosen and rejected as their prompt (the implicit-prompt form); other rows are returned as they are."""
    if "prompt" in row:
        return row
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = _split_texts(chosen, rejected)
    else:
        prompt, chosen, rejected = _split_conversations(chosen, rejected)
    return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}


# -- rendering -----------------------------------------------------------------------------------------------

def is_chat_row(row: dict[str, Any]) -> bool:
    """Whether a preference row is rendered as a conversation (any of its fields is a list of messages)."""
    return any(isinstance(row.get(name), list) for name in ("prompt", *SIDES))


def _split_segments(segments: Segments, at: int) -> tuple[Segments, Segments]:
    """Segments before and after character `at`; those before are untrained (the prompt's own answers)."""
    before: Segments = []
    after: Segments = []
    done = 0
    for text, trained in segments:
        if done + len(text) <= at:
            before.append((text, False))
        elif done >= at:
            after.append((text, trained))
        else:  # the boundary falls inside this segment
            before.append((text[:at - done], False))
            after.append((text[at - done:], trained))
        done += len(text)
    return before, after


def _render_chat_pair(prompt: list, chosen: list, rejected: list, tokenizer: Any, cfg: DataConfig
                      ) -> RenderedPair:
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    template, builtin = chat_template_for(tokenizer, cfg)
    prompt_text = _renderer(tokenizer, template, "prompt")(prompt, True)
    halves = []
    for name, answer in zip(SIDES, (chosen, rejected)):
        rendered = render_chat({"messages": [*prompt, *answer]}, tokenizer, cfg)  # checks the prefix rule
        halves.append(_split_segments(rendered.segments, len(prompt_text)))
    (prompt_segments, chosen_segments), (other_prompt, rejected_segments) = halves
    if prompt_segments != other_prompt or "".join(text for text, _ in prompt_segments) != prompt_text:
        raise RowError("the chat template does not render the prompt the same way before both answers; set "
                       "data.chat_template to a prefix-stable template (or 'builtin')")
    return RenderedPair(prompt_segments, chosen_segments, rejected_segments, add_bos=builtin, add_eos=False,
                        chat=True)


def render_preference(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> RenderedPair:
    """One preference row (after data.columns) as a RenderedPair; RowError names what is wrong with it."""
    row = explicit_row(row)
    prompt = _field(row, "prompt")
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if not is_chat_row(row):
        return RenderedPair([(cfg.prompt_template.replace("{prompt}", prompt), False)],
                            [(chosen, True)], [(rejected, True)])
    if not prompt:
        raise RowError("field 'prompt' is empty")
    return _render_chat_pair(_messages(prompt, "prompt", "user"), _answer_messages(chosen, "chosen"),
                             _answer_messages(rejected, "rejected"), tokenizer, cfg)


def render_chosen(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Rendered:
    """The prompt and the chosen answer of a preference row as one example (how prompts are read back from a
    preference row, e.g. to score a run's questions: the chosen answer is the reference)."""
    return render_preference(row, tokenizer, cfg).side("chosen")
