"""Sources: read rows from a local file or folder, a hub dataset, or a list in memory.

Local JSON and CSV files are read line by line by data/files.py (each row keeps its line; a line
over data.max_row_bytes is refused before it is read whole); an empty file is an error. Parquet
files and hub datasets go through Hugging Face `datasets`; their rows get the same size cap. A
folder's files and their splits are found as `datasets` finds them (train*, test*, validation*,
...); a file of another type in it is refused, as it is when given alone. Selection (shuffle,
limit, validation hold-out) is plain index arithmetic, the same for every kind of source.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

from lorakit.data.config import DataConfig
from lorakit.data.files import read_text_file, too_big
from lorakit.data.rows import NumberedRows, RowPlaces, in_memory
from lorakit.errors import ConfigError, DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # the local file types lorakit reads
TYPES = ", ".join(SUFFIXES)

Rows = Any  # a list of dicts or a datasets.Dataset: both have len() and integer indexing


def row_bytes(value: Any) -> int:
    """The UTF-8 size of the text in a row (keys and strings, nested), for the data.max_row_bytes check."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(row_bytes(key) + row_bytes(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return sum(row_bytes(item) for item in value)
    return 0


# ----------------------------------------------------------------------------- files, folders, hub


def _load_dataset(path: str, split: str, cfg: DataConfig, **kwargs: Any) -> Rows:
    try:
        return datasets.load_dataset(path, split=split, cache_dir=cfg.cache_dir, **kwargs)
    except Exception as error:  # bad file, unknown split, no network: say which source failed
        raise DataError(f"could not load data source {kwargs.get('data_files', path)!r} "
                        f"(split {split!r}): {type(error).__name__}: {error}") from error


def _read_file(path: Path, name: str, cfg: DataConfig) -> tuple[Rows, list[int] | None]:
    """(rows, line of each row, or None where rows have no lines) of one local file, which has rows."""
    if path.suffix.lower() == ".parquet":
        rows, lines = _load_dataset("parquet", "train", cfg, data_files=str(path)), None
    else:
        rows, lines = read_text_file(path, name, cfg.max_row_bytes)
    if len(rows) == 0:
        raise DataError(f"{name} has no rows")
    return rows, lines


def _folder_files(folder: Path, source: str, split: str) -> list[tuple[Path, str]]:
    """(path, name in messages) of the files of one split of a folder, as `datasets` finds them."""
    try:
        found = DataFilesDict.from_local_or_remote(get_data_patterns(str(folder)), base_path=str(folder))
    except EmptyDatasetError:
        raise DataError(f"data source {source!r}: the folder holds no data files (use {TYPES})") from None
    splits = {str(key): files for key, files in found.items()}
    if split not in splits:
        raise DataError(f"data source {source!r} has no split {split!r} (its files give: {', '.join(splits)})")
    files = [(Path(file), str(Path(source) / Path(file).relative_to(folder))) for file in splits[split]]
    unsupported = [str(path.relative_to(folder)) for path, _ in files if path.suffix.lower() not in SUFFIXES]
    if unsupported:
        raise DataError(f"data source {source!r}: unsupported file type{'s' if len(unsupported) > 1 else ''} "
                        f"{', '.join(unsupported)} (use {TYPES})")
    return files


def _read_local(path: Path, source: str, split: str, cfg: DataConfig) -> tuple[Rows, RowPlaces]:
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"data source {source!r}: unsupported file type {path.suffix!r} (use {TYPES})")
        if split != "train":
            raise DataError(f"could not load data source {source!r} (split {split!r}): a file has only the "
                            "split 'train'")
        files = [(path, source)]
    else:
        files = _folder_files(path.resolve(), source, split)
    places, parts = RowPlaces(), []
    places.folder = path.parent if path.is_file() else path
    for file, name in files:
        rows, lines = _read_file(file, name, cfg)
        places.add(name, len(rows), lines)
        parts.append(rows)
    if len(parts) == 1:
        return parts[0], places
    return [row for part in parts for row in (part if isinstance(part, list) else part.to_list())], places


def read_rows(source: str | list[dict[str, Any]], split: str, cfg: DataConfig) -> tuple[Rows, RowPlaces]:
    """(all rows of one split of `source`, not yet shuffled or limited; where each row is in it)."""
    if isinstance(source, list):
        return source, in_memory(len(source))
    if not isinstance(source, str):
        raise ConfigError(f"data.source must be a path, a hub dataset id or a list of rows, "
                          f"got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file() or path.is_dir():
        return _read_local(path, source, split, cfg)
    if source.startswith((".", "/", "~")) or path.suffix.lower() in SUFFIXES:
        raise DataError(f"data source {source!r}: no such file or folder")
    rows = _load_dataset(source, split, cfg, name=cfg.subset)
    places = RowPlaces()
    places.add(source, len(rows))
    return rows, places


def read_source(source: str | list[dict[str, Any]], split: str, cfg: DataConfig) -> Rows:
    """All rows of one split of `source` (not yet shuffled or limited)."""
    return read_rows(source, split, cfg)[0]


# ----------------------------------------------------------------------------- selection


def take(rows: Rows, indices: list[int], places: RowPlaces, max_row_bytes: int) -> NumberedRows:
    """The rows at `indices` as plain dicts that remember their places; a row over `max_row_bytes` of
    text (a parquet, hub or in-memory row: line files were checked as they were read) is an error."""
    picked = [rows[i] for i in indices] if isinstance(rows, list) else rows.select(indices).to_list()
    for index, row in zip(indices, picked):
        if (size := row_bytes(row)) > max_row_bytes:
            raise too_big(places(index), size, max_row_bytes)
    return NumberedRows(picked, list(indices), places)


def _first(read: tuple[Rows, RowPlaces], limit: int | None, cfg: DataConfig) -> NumberedRows:
    rows, places = read
    return take(rows, list(range(len(rows) if limit is None else min(limit, len(rows)))), places, cfg.max_row_bytes)


def hold_out(order: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split `order` into (train, validation); the validation share is picked at random (seeded)."""
    n_val = max(1, round(len(order) * fraction))
    if n_val >= len(order):
        raise DataError(f"data.val_fraction={fraction} of {len(order)} rows leaves no training rows")
    picked = set(random.Random(f"lorakit-val:{seed}").sample(range(len(order)), n_val))
    train = [index for k, index in enumerate(order) if k not in picked]
    val = [index for k, index in enumerate(order) if k in picked]
    return train, val


def load_rows(cfg: DataConfig, rows: list[dict[str, Any]] | None = None) -> tuple[NumberedRows, list[dict[str, Any]]]:
    """(train rows, validation rows) as described by cfg; `rows` overrides cfg.source.

    Order of operations: read the split, shuffle (if cfg.shuffle), keep the first cfg.limit
    rows, then take validation rows from val_source / val_split or hold out val_fraction.
    """
    source = rows if rows is not None else cfg.source
    if source is None:
        raise ConfigError("data.source is not set: give a hub dataset id, a local file or folder, "
                          "or a list of rows")
    train_all, places = read_rows(source, cfg.split, cfg)
    order = list(range(len(train_all)))
    if cfg.shuffle:
        random.Random(f"lorakit-shuffle:{cfg.seed}").shuffle(order)
    if cfg.limit is not None:
        order = order[:cfg.limit]
    val: list[dict[str, Any]] = []
    if cfg.val_source is not None:
        val = _first(read_rows(cfg.val_source, cfg.val_split or "train", cfg), cfg.val_limit, cfg)
    elif cfg.val_split is not None:
        if isinstance(source, list):
            raise ConfigError("data.val_split needs a source with named splits; for rows in memory "
                              "use data.val_source or data.val_fraction")
        val = _first(read_rows(source, cfg.val_split, cfg), cfg.val_limit, cfg)
    elif cfg.val_fraction > 0:
        order, val_order = hold_out(order, cfg.val_fraction, cfg.seed)
        val = take(train_all, val_order[:cfg.val_limit], places, cfg.max_row_bytes)
    train = take(train_all, order, places, cfg.max_row_bytes)
    if not train:
        name = repr(source) if isinstance(source, str) else "(rows in memory)"
        raise DataError(f"data source {name} has no rows in split {cfg.split!r}")
    return train, val
