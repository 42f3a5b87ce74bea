"""What every row format produces (data/formats.py, data/chat.py): text segments, or a row error;
and the one rule that names a row in a message (`RowPlaces`, `place_of`)."""
from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import DataError


class RowError(DataError):
    """A row that does not fit its format; the caller prefixes the row's place (`place_of`)."""


@dataclass
class Rendered:
    """One row as text segments, ready to tokenize."""

    segments: list[tuple[str, bool]]  # (text, trained) in order
    add_bos: bool = True  # prepend the tokenizer's own leading special tokens (BOS), untrained
    add_eos: bool = True  # append tokenizer.eos_token_id, trained, so the model learns to stop
    media: dict[str, list[Any]] = field(default_factory=dict)  # modality -> decoded items, in placeholder order


class RowPlaces:
    """Names the rows of a source the way the user finds them. The one numbering rule, 1-based:

    - a row that is a line of a file (JSON lines, CSV): 'FILE line N', N the line in the file (a CSV's
      header is line 1; a CSV record spanning several lines is named by its first);
    - a row without a line of its own (an element of a JSON array, parquet, a hub dataset): 'SOURCE row N';
    - a row given in memory: 'row N'.

    A source is read part by part (the files of a folder); `add` appends one part's rows.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []  # index of each part's first row
        self._parts: list[tuple[str | None, Sequence[int] | None]] = []  # (name, line of each row or None)
        self.count = 0
        self.folder: Path | None = None  # the local folder the rows were read from (relative media paths start there)

    def add(self, name: str | None, count: int, lines: Sequence[int] | None = None) -> None:
        """Append `count` rows of the part called `name` (None: rows in memory); `lines`: their line numbers."""
        self._starts.append(self.count)
        self._parts.append((name, None if lines is None else array("q", lines)))
        self.count += count

    def __call__(self, index: int) -> str:
        """The place of row `index` (0-based, in the source's order)."""
        part = bisect_right(self._starts, index) - 1
        name, lines = self._parts[part]
        if lines is not None:
            return f"{name} line {lines[index - self._starts[part]]}"
        number = index - self._starts[part] + 1
        return f"{name} row {number}" if name else f"row {number}"


def in_memory(count: int) -> RowPlaces:
    """The places of `count` rows given in memory: row 1, row 2, ..."""
    places = RowPlaces()
    places.add(None, count)
    return places


class NumberedRows(list):
    """A list of rows that remembers where each came from in its source (before shuffling, limiting or
    holding out), so an error about a bad row names the row the user can find."""

    def __init__(self, rows: list[dict[str, Any]], numbers: list[int], places: RowPlaces):
        super().__init__(rows)
        self.numbers = numbers  # each row's 0-based index in its source
        self.places = places

    def place(self, k: int) -> str:
        """Where the k-th row of this list is in its source."""
        return self.places(self.numbers[k])


def place_of(rows: Sequence[Any], k: int) -> str:
    """Where the k-th row of `rows` is: its place in its source, or 'row k+1' of a plain list."""
    return rows.place(k) if isinstance(rows, NumberedRows) else f"row {k + 1}"


def keep_places(new: list[dict[str, Any]], rows: Sequence[Any]) -> list[dict[str, Any]]:
    """`new`, the first len(new) rows of `rows` (maybe changed), still knowing their places and source folder
    when `rows` does (a slice or a comprehension of NumberedRows is a plain list)."""
    if not isinstance(rows, NumberedRows):
        return new
    return NumberedRows(new, rows.numbers[:len(new)], rows.places)
