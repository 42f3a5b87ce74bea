"""Local JSON and CSV files, read line by line with the standard library.

Every row keeps the line it starts on, for messages (data/rows.py names rows); a line longer than
data.max_row_bytes is refused before it is read whole, so one huge line cannot exhaust memory; and
invalid JSON or CSV, or text that is not UTF-8, is one error naming the file, line and column.

A .json or .jsonl file holds JSON lines, one JSON array (of objects, or of strings: text rows, as
`datasets` reads them), or one object of equal-length column lists (its first line a lone '{');
the two documents are read whole, and each array element is checked against the cap. A CSV file
has a header; its cells are text, an empty cell is null, and a record may span lines (quoted).
"""
from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Optional

from lorakit.errors import DataError

JSON_SPACE = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between values
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}
Read = tuple[list[dict[str, Any]], Optional[list[int]]]  # (rows, the line each row starts on; None: no lines)


def too_big(place: str, size: int, cap: int, *, at_least: bool = False) -> DataError:
    """The error for a row over data.max_row_bytes (`at_least`: `size` is what was read before stopping)."""
    told = f"at least {size:,}" if at_least else f"{size:,}"
    return DataError(f"{place}: the row is {told} bytes, over data.max_row_bytes ({cap:,}); shorten or remove "
                     "the row, or raise data.max_row_bytes")


def _rest_of_line(handle: BinaryIO) -> int:
    """Skip to the end of the current line in 1 MiB steps; the bytes skipped (newline excluded)."""
    skipped = 0
    while chunk := handle.readline(1 << 20):
        if chunk.endswith(b"\n"):
            return skipped + len(chunk.rstrip(b"\r\n"))
        skipped += len(chunk)
    return skipped


def read_lines(handle: BinaryIO, name: str, cap: int) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line without its end) for every line; a line over `cap` bytes is an error
    raised before more than `cap` + 2 of its bytes are held in memory."""
    number = 0
    while line := handle.readline(cap + 2):  # `cap` bytes, then at most "\r\n"
        number += 1
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        ended = line.endswith(b"\n")
        content = line.rstrip(b"\r\n") if ended else line
        if len(content) > cap:
            raise too_big(f"{name} line {number}", len(content) + (0 if ended else _rest_of_line(handle)), cap)
        yield number, content


def _utf8(data: bytes, name: str, first_line: int = 1) -> str:
    """`data` decoded, or an error naming the line and column (in bytes) of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise DataError(f"{name} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def _invalid_json(name: str, error: json.JSONDecodeError, line: int | None = None) -> DataError:
    return DataError(f"{name} line {line or error.lineno}: invalid JSON: {error.msg} (column {error.colno})")


# ----------------------------------------------------------------------------- JSON


def _read_json(handle: BinaryIO, name: str, cap: int) -> Read:
    """(rows, line of each row) of JSON lines; (rows, None) of a file that is one JSON document: an array
    (it starts with '[') or an object of columns (its first line is a lone '{')."""
    if _first_byte(handle) == b"[":  # an array may be one long line: its elements are checked instead
        return _json_document(handle.read(), name, cap), None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, content in read_lines(handle, name, cap):
        text = _utf8(content, name, number)
        if not text.strip():
            continue
        if not rows and text.strip() == "{":
            handle.seek(0)
            return _json_document(handle.read(), name, cap), None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise _invalid_json(name, error, number) from None
        if not isinstance(value, dict):
            raise DataError(f"{name} line {number}: expected a JSON object, got {JSON_TYPES.get(type(value))}")
        rows.append(value)
        lines.append(number)
    return rows, lines


def _first_byte(handle: BinaryIO) -> bytes:
    """The first byte of the file that is not a byte order mark or whitespace (b"" if none); rewinds."""
    first, chunk = b"", handle.read(1 << 16).removeprefix(codecs.BOM_UTF8)
    while chunk and not first:
        first = chunk.lstrip(b" \t\r\n")[:1]
        chunk = handle.read(1 << 16)
    handle.seek(0)
    return first


def _json_document(data: bytes, name: str, cap: int) -> list[dict[str, Any]]:
    """The rows of a file that is one JSON array, or one object of equal-length column lists."""
    text = _utf8(data.removeprefix(codecs.BOM_UTF8), name)
    start = JSON_SPACE.match(text).end()
    if text.startswith("[", start):
        return _json_array(text, start, name, cap)
    try:
        columns = json.loads(text)
    except json.JSONDecodeError as error:
        raise _invalid_json(name, error) from None
    lists = list(columns.values()) if isinstance(columns, dict) else []
    if not lists or any(not isinstance(v, list) or len(v) != len(lists[0]) for v in lists):
        raise DataError(f"{name}: expected JSON lines, a JSON array of objects, or one object of "
                        "equal-length column lists")
    return [dict(zip(columns, values)) for values in zip(*lists)]


def _json_array(text: str, start: int, name: str, cap: int) -> list[dict[str, Any]]:
    """The elements of the JSON array at text[start], each checked against `cap` (its bytes in the file)
    before it becomes a row. Strings become text rows {"text": ...}, as `datasets` reads them."""
    decoder = json.JSONDecoder()
    rows: list[dict[str, Any]] = []
    pos = JSON_SPACE.match(text, start + 1).end()
    while not text.startswith("]", pos):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise _invalid_json(name, error) from None
        place = f"{name} row {len(rows) + 1}"
        if end - pos > cap // 4 and (size := len(text[pos:end].encode("utf-8", "surrogatepass"))) > cap:
            raise too_big(place, size, cap)
        if isinstance(value, str):
            value = {"text": value}
        if not isinstance(value, dict):
            raise DataError(f"{place}: expected a JSON object, got {JSON_TYPES.get(type(value))}")
        rows.append(value)
        pos = JSON_SPACE.match(text, end).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise _invalid_json(name, json.JSONDecodeError("Expecting ',' delimiter", text, pos))
        pos = JSON_SPACE.match(text, pos + 1).end()
        if text.startswith("]", pos):  # a trailing comma: JSON wants another value
            raise _invalid_json(name, json.JSONDecodeError("Expecting value", text, pos))
    after = JSON_SPACE.match(text, pos + 1).end()
    if after < len(text):
        raise _invalid_json(name, json.JSONDecodeError("Extra data", text, after))
    return rows


# ----------------------------------------------------------------------------- CSV


class _CsvFeed:
    """Decoded lines for csv.reader, which pulls one line at a time; remembers where the record being
    read began and refuses one over `cap` bytes (a quoted field may span lines)."""

    def __init__(self, handle: BinaryIO, name: str, cap: int):
        self.lines, self.name, self.cap = read_lines(handle, name, cap), name, cap
        self.last = 0  # the last line handed out
        self.start, self.size = 1, 0  # the current record's first line and bytes so far

    def next_record(self) -> None:
        self.start, self.size = self.last + 1, 0

    def __iter__(self) -> Iterator[str]:
        for number, content in self.lines:
            self.last = number
            self.size += len(content) + (number > self.start)  # a newline inside the record counts
            if self.size > self.cap:
                raise too_big(f"{self.name} line {self.start}", self.size, self.cap, at_least=True)
            yield _utf8(content, self.name, number) + "\n"


def _read_csv(handle: BinaryIO, name: str, cap: int) -> Read:
    """(rows, line of each row's first line) of a CSV file with a header; every record has its columns."""
    csv.field_size_limit(max(csv.field_size_limit(), cap))  # the csv module's only limit is process-wide
    feed = _CsvFeed(handle, name, cap)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        for fields in csv.reader(feed):
            start = feed.start
            feed.next_record()
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if header is None:
                header, header_line = fields, start
                if len(set(header)) < len(header):
                    twice = next(column for column in header if header.count(column) > 1)
                    raise DataError(f"{name} line {start}: the header names the column {twice!r} twice")
                continue
            if len(fields) != len(header):
                raise DataError(f"{name} line {start}: {len(fields)} fields, but the header (line {header_line}) "
                                f"has {len(header)} columns; quote a field that holds a comma")
            rows.append({column: value if value != "" else None for column, value in zip(header, fields)})
            lines.append(start)
    except csv.Error as error:
        raise DataError(f"{name} line {feed.start}: invalid CSV: {error}") from None
    return rows, lines


# ----------------------------------------------------------------------------- a file


def read_text_file(path: Path, name: str, cap: int) -> Read:
    """(rows, line of each row, or None where the rows have no lines) of a local JSON or CSV file;
    `name` is the file as messages call it, `cap` is data.max_row_bytes."""
    reader = _read_csv if path.suffix.lower() == ".csv" else _read_json
    try:
        with path.open("rb") as handle:
            return reader(handle, name, cap)
    except OSError as error:
        raise DataError(f"cannot read {name}: {error.strerror or error}") from None
