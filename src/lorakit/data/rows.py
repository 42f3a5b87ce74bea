"""What every row format produces (data/formats.py, data/chat.py): text segments, or a row error."""
from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import DataError


class RowError(DataError):
    """A row that does not fit its format; the caller prefixes the row number."""


@dataclass
class Rendered:
    """One row as text segments, ready to tokenize."""

    segments: list[tuple[str, bool]]  # (text, trained) in order
    add_bos: bool = True  # prepend the tokenizer's own leading special tokens (BOS), untrained
    add_eos: bool = True  # append tokenizer.eos_token_id, trained, so the model learns to stop
