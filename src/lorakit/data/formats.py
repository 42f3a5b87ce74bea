"""Row formats: a registry of renderers that turn one dataset row into text segments.

A renderer reads the fields it needs from a row (after the column mapping) and returns
`Rendered`: an ordered list of (text, trained) segments. The tokenizer step encodes each
segment on its own and concatenates the ids, so the boundary between prompt and answer is
exact (no BPE merge across it) and the loss mask follows the segments.

Add a format with `register_format(RowFormat(...))`; auto-detection tries the registered
formats in order and picks the first whose `signature` columns (or one of its `also` sets) are
all present.

Preference rows (prompt, chosen, rejected: data/pairs.py) are a format of their own kind: it has a
`render_pair` that renders both sides. Detection looks among the formats of the kind the objective
trains on (SFT rows for train.objective sft, preference rows for the preference objectives), so rows
holding both (a `messages` column beside chosen/rejected, as some preference datasets have) suit
either, and rows of only the other kind are one clear error that says which objective trains them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.data.chat import render_chat
from lorakit.data.pairs import RenderedPair, render_chosen, render_preference
from lorakit.data.rows import Rendered, RowError
from lorakit.errors import DataError

if TYPE_CHECKING:
    from lorakit.data.config import DataConfig


Renderer = Callable[[dict[str, Any], Any, "DataConfig"], Rendered]
PairRenderer = Callable[[dict[str, Any], Any, "DataConfig"], RenderedPair]

# The objectives that train on preference rows (train.objective; named here for messages only).
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")


@dataclass(frozen=True)
class RowFormat:
    """A named row format: the columns that identify it and the function that renders a row."""

    name: str
    signature: tuple[str, ...]  # columns whose presence selects this format in 'auto' mode
    render: Renderer = field(repr=False)
    description: str = ""
    also: tuple[tuple[str, ...], ...] = ()  # other column sets that select it (the renderer reads them)
    render_pair: PairRenderer | None = field(default=None, repr=False)  # preference rows: both sides

    @property
    def pairs(self) -> bool:
        """Whether the rows are preference rows (a prompt with a chosen and a rejected answer)."""
        return self.render_pair is not None

    def matches(self, columns: set[str]) -> bool:
        """Whether rows with these columns are in this format."""
        return any(set(signature) <= columns for signature in (self.signature, *self.also))

    def columns_text(self) -> str:
        """The columns that select this format, for messages: 'messages or conversations'."""
        return " or ".join("+".join(signature) for signature in (self.signature, *self.also))


FORMATS: dict[str, RowFormat] = {}


def register_format(fmt: RowFormat) -> RowFormat:
    """Add a format to the registry (later registrations have lower auto-detect priority)."""
    FORMATS[fmt.name] = fmt
    return fmt


def _columns(row: dict[str, Any]) -> str:
    return ", ".join(row) if row else "none"


def text_field(row: dict[str, Any], name: str, *, required: bool = True) -> str:
    """The string value of `row[name]`, or a RowError naming the missing or mistyped field."""
    value = row.get(name)
    if value is None:
        if not required:
            return ""
        raise RowError(f"field {name!r} is missing (columns: {_columns(row)})")
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise RowError(f"field {name!r} must be a string, got {type(value).__name__} {shown}")
    return value


def apply_columns(row: Any, columns: dict[str, str]) -> dict[str, Any]:
    """Rename dataset columns to format fields: {field: column}. Unmapped columns pass through."""
    if not isinstance(row, dict):
        raise RowError(f"expected a dict of columns, got {type(row).__name__}")
    if not columns:
        return row
    sources = set(columns.values())
    mapped = {key: value for key, value in row.items() if key not in sources}
    for field_name, column in columns.items():
        if column not in row:
            raise RowError(f"column {column!r} (mapped to field {field_name!r}) is missing "
                           f"(columns: {_columns(row)})")
        mapped[field_name] = row[column]
    return mapped


def _objectives(pairs: bool) -> str:
    names = PREFERENCE_OBJECTIVES if pairs else ("sft",)
    return "train.objective " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])


def wrong_kind(fmt: RowFormat, pairs: bool) -> DataError:
    """The one-line error for rows of a format the objective does not train on."""
    if fmt.pairs:
        return DataError(f"the rows are preference rows ({fmt.columns_text()}), which {_objectives(True)} "
                         "trains on, not sft: set train.objective, or give SFT rows (e.g. prompt+completion, "
                         "messages)")
    return DataError(f"{_objectives(True)} trains on preference rows (prompt+chosen+rejected, or chosen+rejected "
                     f"sharing their prompt; map other column names with data.columns), not {fmt.name} rows, "
                     f"which {_objectives(False)} trains on")


def check_kind(fmt: RowFormat, pairs: bool) -> RowFormat:
    """`fmt` (set in data.format), when it is of the kind the objective trains on (`pairs`: a preference
    objective); else the error, naming the setting."""
    if fmt.pairs == pairs:
        return fmt
    wanted = ("preference (or auto)" if pairs else "an SFT format such as prompt_completion or messages (or auto)")
    raise DataError(f"data.format is {fmt.name}, but {_objectives(pairs)} trains on "
                    f"{'preference' if pairs else 'SFT'} rows: set data.format to {wanted}, or "
                    f"train.objective to {'sft' if pairs else 'dpo, ipo, simpo or orpo'}")


def detect_format(columns: Iterable[str], pairs: bool = False) -> RowFormat:
    """The first registered format of the wanted kind (`pairs`: preference rows, else SFT rows) whose
    signature columns (or one of its `also` sets) are all present."""
    present = set(columns)
    for fmt in FORMATS.values():
        if fmt.pairs == pairs and fmt.matches(present):
            return fmt
    for fmt in FORMATS.values():
        if fmt.matches(present):
            raise wrong_kind(fmt, pairs)
    expected = "; ".join(f"{f.columns_text()} ({f.name})" for f in FORMATS.values() if f.pairs == pairs)
    raise DataError(f"cannot detect the row format from columns ({', '.join(sorted(present)) or 'none'}); "
                    f"expected one of: {expected}. Set data.format, or map columns with data.columns")


# -- the built-in formats -------------------------------------------------------------------

def render_prompt_completion(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Rendered:
    """prompt (untrained, through cfg.prompt_template) then completion + EOS (trained)."""
    prompt = text_field(row, "prompt")
    completion = text_field(row, "completion")
    return Rendered([(cfg.prompt_template.replace("{prompt}", prompt), False), (completion, True)])


# The prompt layout of Stanford Alpaca (Taori et al. 2023), the de facto standard for this format.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_alpaca(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Rendered:
    """Alpaca template around instruction (+ optional input); the output + EOS is trained."""
    instruction = text_field(row, "instruction")
    context = text_field(row, "input", required=False)
    output = text_field(row, "output")
    template = ALPACA_PROMPT if context.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.replace("{instruction}", instruction).replace("{input}", context)
    return Rendered([(prompt, False), (output, True)])


def render_text(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Rendered:
    """Plain text for continued pre-training: every token (and the EOS) is trained."""
    return Rendered([(text_field(row, "text"), True)])


register_format(RowFormat("chat", ("messages",), render_chat,
                          "a `messages` list of {role, content} (or ShareGPT's `conversations` of {from, value}); "
                          "every assistant turn is trained", also=(("conversations",),)))
register_format(RowFormat("alpaca", ("instruction", "output"), render_alpaca,
                          "instruction, optional input, output (Alpaca prompt template)"))
register_format(RowFormat("prompt_completion", ("prompt", "completion"), render_prompt_completion,
                          "prompt (not trained) and completion (trained)"))
register_format(RowFormat("text", ("text",), render_text, "plain text, every token trained"))
register_format(RowFormat("preference", ("prompt", "chosen", "rejected"), render_chosen,
                          "a prompt with a chosen and a rejected answer, as text or chat messages (or chosen and "
                          "rejected conversations sharing their prompt); for the preference objectives",
                          also=(("chosen", "rejected"),), render_pair=render_preference))
