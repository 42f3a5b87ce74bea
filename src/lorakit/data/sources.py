"""Sources: read rows from a hub dataset, a local file or folder, or a list in memory.

Files and hub ids go through Hugging Face `datasets` (json/csv/parquet builders for local
files); selection (shuffle, limit, validation hold-out) is plain index arithmetic, the same
for every kind of source.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets

from lorakit.data.config import DataConfig
from lorakit.errors import ConfigError, DataError

# file suffix -> datasets builder
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

Rows = Any  # a list of dicts or a datasets.Dataset: both have len() and integer indexing


def _load_dataset(path: str, split: str, cfg: DataConfig, **kwargs: Any) -> Rows:
    try:
        return datasets.load_dataset(path, split=split, cache_dir=cfg.cache_dir, **kwargs)
    except Exception as error:  # bad file, unknown split, no network: say which source failed
        raise DataError(f"could not load data source {kwargs.get('data_files', path)!r} "
                        f"(split {split!r}): {type(error).__name__}: {error}") from error


def read_source(source: str | list[dict[str, Any]], split: str, cfg: DataConfig) -> Rows:
    """All rows of one split of `source` (not yet shuffled or limited)."""
    if isinstance(source, list):
        return source
    if not isinstance(source, str):
        raise ConfigError(f"data.source must be a path, a hub dataset id or a list of rows, "
                          f"got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"data source {source!r}: unsupported file type {path.suffix!r} "
                            f"(use {', '.join(FILE_BUILDERS)})")
        return _load_dataset(builder, split, cfg, data_files=str(path))
    if path.is_dir():
        return _load_dataset(str(path), split, cfg)
    if source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise DataError(f"data source {source!r}: no such file or folder")
    return _load_dataset(source, split, cfg, name=cfg.subset)


class NumberedRows(list):
    """A list of rows that remembers each row's number in its source (0-based, before shuffling,
    limiting or holding out), so an error about a bad row names the row the user can find."""

    def __init__(self, rows: list[dict[str, Any]], numbers: list[int]):
        super().__init__(rows)
        self.numbers = numbers


def take(rows: Rows, indices: list[int]) -> NumberedRows:
    """The rows at `indices`, as plain dicts numbered by their place in `rows`."""
    if isinstance(rows, list):
        return NumberedRows([rows[i] for i in indices], list(indices))
    return NumberedRows(rows.select(indices).to_list(), list(indices))


def _first(rows: Rows, limit: int | None) -> NumberedRows:
    return take(rows, list(range(len(rows) if limit is None else min(limit, len(rows)))))


def hold_out(order: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split `order` into (train, validation); the validation share is picked at random (seeded)."""
    n_val = max(1, round(len(order) * fraction))
    if n_val >= len(order):
        raise DataError(f"data.val_fraction={fraction} of {len(order)} rows leaves no training rows")
    picked = set(random.Random(f"lorakit-val:{seed}").sample(range(len(order)), n_val))
    train = [index for k, index in enumerate(order) if k not in picked]
    val = [index for k, index in enumerate(order) if k in picked]
    return train, val


def load_rows(cfg: DataConfig, rows: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, validation rows) as described by cfg; `rows` overrides cfg.source.

    Order of operations: read the split, shuffle (if cfg.shuffle), keep the first cfg.limit
    rows, then take validation rows from val_source / val_split or hold out val_fraction.
    """
    source = rows if rows is not None else cfg.source
    if source is None:
        raise ConfigError("data.source is not set: give a hub dataset id, a local file or folder, "
                          "or a list of rows")
    train_all = read_source(source, cfg.split, cfg)
    order = list(range(len(train_all)))
    if cfg.shuffle:
        random.Random(f"lorakit-shuffle:{cfg.seed}").shuffle(order)
    if cfg.limit is not None:
        order = order[:cfg.limit]
    val: list[dict[str, Any]] = []
    if cfg.val_source is not None:
        val = _first(read_source(cfg.val_source, cfg.val_split or "train", cfg), cfg.val_limit)
    elif cfg.val_split is not None:
        if isinstance(source, list):
            raise ConfigError("data.val_split needs a source with named splits; for rows in memory "
                              "use data.val_source or data.val_fraction")
        val = _first(read_source(source, cfg.val_split, cfg), cfg.val_limit)
    elif cfg.val_fraction > 0:
        order, val_order = hold_out(order, cfg.val_fraction, cfg.seed)
        val = take(train_all, val_order[:cfg.val_limit])
    train = take(train_all, order)
    if not train:
        name = repr(source) if isinstance(source, str) else "(rows in memory)"
        raise DataError(f"data source {name} has no rows in split {cfg.split!r}")
    return train, val
