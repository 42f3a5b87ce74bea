"""Chat rows: render a conversation with a chat template and locate every assistant turn.

Assistant spans are found by rendering prefixes of the conversation, which works with any
template that renders a conversation's prefix as a prefix of the whole:

    start of turn k = len(render(messages[:k], add_generation_prompt=True))
    end of turn k   = len(render(messages[:k + 1]))

The text between them (the answer and the template's end-of-turn marker) is trained; the
rest (system, user turns, role headers) is not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.data.rows import Rendered, RowError
from lorakit.media import placeholder

if TYPE_CHECKING:
    from lorakit.data.config import DataConfig

# lorakit's built-in template, used when the tokenizer has none (or data.chat_template: builtin):
#   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}{eos_token}\n
# The EOS after each answer is part of the trained span, so the model learns to end its turn.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The roles a message may have, whatever the template: a template that does not know a role may drop its
# message without a word (the embedded model's does), and the model would learn answers without questions.
ROLES = ("system", "user", "assistant")
# ShareGPT-style rows use {"from": ..., "value": ...} and these role names; they are renamed, as is OpenAI's
# newer name for the system message (which `lorakit serve` accepts).
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "developer": "system"}
# The columns that hold a conversation: lorakit's (and OpenAI's) `messages`, ShareGPT's `conversations`.
CHAT_COLUMNS = ("messages", "conversations")


def chat_column(row: dict[str, Any]) -> str:
    """The column of `row` that holds its conversation ('messages' when neither is present)."""
    return next((column for column in CHAT_COLUMNS if column in row), CHAT_COLUMNS[0])


def content_text(content: Any, where: str, image_part: str = "image") -> Any:
    """A message's content as text: a string as it is, or a list of parts (OpenAI's, TRL's) joined in order by
    newlines, each `{"type": "text", "text": ...}` its text and each part of type `image_part` the image
    placeholder (`<image>`; the items themselves are the row's `images` column, or the request's URLs). Anything
    else is returned as it is, for the caller's own message."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == image_part:
            texts.append(placeholder("image"))
        else:
            raise RowError(f"{where} part {index} must be {{\"type\": \"text\", \"text\": STRING}} or "
                           f"{{\"type\": \"{image_part}\"}}, got {str(part)[:60]}")
    return "\n".join(texts)


def _message(item: Any, where: str) -> dict[str, str]:
    """One message as {role, content}, accepting ShareGPT's {from, value} spelling and role names."""
    if not isinstance(item, dict):
        raise RowError(f"{where} must be a dict with role and content, got {type(item).__name__}")
    role = item.get("role", item.get("from"))
    content = content_text(item.get("content", item.get("value")), where)
    if not isinstance(role, str):
        raise RowError(f"{where} has no string 'role' (keys: {', '.join(item)})")
    if ROLE_ALIASES.get(role, role) not in ROLES:
        raise RowError(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)}, and the aliases "
                       f"{', '.join(ROLE_ALIASES)})")
    if not isinstance(content, str):
        got = "no 'content'" if content is None else f"'content' of type {type(content).__name__}"
        raise RowError(f"{where} has {got}; expected a string (keys: {', '.join(item)})")
    return {"role": ROLE_ALIASES.get(role, role), "content": content}


def normalize_messages(value: Any, row: dict[str, Any], column: str = "messages") -> list[dict[str, str]]:
    """Validate a row's conversation (the list in `column`); at least one assistant turn is required."""
    if value is None:
        raise RowError(f"field {column!r} is missing (columns: {', '.join(row)})")
    if not isinstance(value, list):
        raise RowError(f"field {column!r} must be a list of {{role, content}} dicts, got {type(value).__name__}")
    messages = [_message(item, f"{column}[{j}]") for j, item in enumerate(value)]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"field {column!r} has no assistant turn to train on")
    return messages


def chat_template_for(tokenizer: Any, cfg: DataConfig) -> tuple[str | None, bool]:
    """(template to pass to apply_chat_template, whether it is the built-in one).

    The built-in template carries no BOS, so the tokenizer's own BOS is prepended to it; a
    tokenizer's or user's template decides its BOS itself (as apply_chat_template does).
    """
    if cfg.chat_template == "builtin":
        return BUILTIN_CHAT_TEMPLATE, True
    if cfg.chat_template:
        return cfg.chat_template, False
    if getattr(tokenizer, "chat_template", None):
        return None, False
    return BUILTIN_CHAT_TEMPLATE, True


def _renderer(tokenizer: Any, template: str | None, column: str):
    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as error:  # a Jinja error or a template's raise_exception
            raise RowError(f"chat template failed on field {column!r}: {error}") from error
        return text

    return render


def _prefix_end(full: str, prefix: str, turn: int) -> int:
    if not full.startswith(prefix):
        raise RowError(f"the chat template does not render the conversation up to message {turn} as a "
                       "prefix of the whole conversation, so assistant turns cannot be located; "
                       "set data.chat_template to a prefix-stable template (or 'builtin')")
    return len(prefix)


def render_chat(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Rendered:
    """Render a chat row (`messages`, or ShareGPT's `conversations`); every assistant turn (with its
    end-of-turn marker) is trained."""
    column = chat_column(row)
    messages = normalize_messages(row.get(column), row, column)
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    template, builtin = chat_template_for(tokenizer, cfg)
    render = _renderer(tokenizer, template, column)
    full = render(messages, False)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned to a segment
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_end(full, render(messages[:k], True), k)
        end = _prefix_end(full, render(messages[: k + 1], False), k + 1)
        if start < done or end < start:
            raise RowError(f"the chat template renders assistant message {k} out of order; "
                           "set data.chat_template to a prefix-stable template (or 'builtin')")
        answer_end = start + len(full[start:end].rstrip())  # a newline after the end-of-turn is context
        segments += [(full[done:start], False), (full[start:answer_end], True)]
        done = answer_end
    segments.append((full[done:], False))
    return Rendered([s for s in segments if s[0]], add_bos=builtin, add_eos=False)
