"""Tokenized rows kept across runs: the same rows, tokenizer and settings give the same examples, read back.

    examples, stats = cached_tokenize(train_rows, tokenizer, cfg)   # tokenize_rows, bit for bit

The file is named by a key, a hash of everything `tokenize_rows` reads, so a change to any of it is
a new key (a miss), never a stale hit:

- the rows themselves, in order (what was read from the data file or hub dataset, after
  shuffle, limit and the validation hold-out: the data bytes and the selection alike);
- the tokenizer: its whole serialised backend (vocabulary, merges, normaliser, pre-tokeniser,
  post-processor, added tokens) or, for a tokenizer without one, its vocabulary and model file;
  its special tokens and their ids, chat template, init settings, class, and the ids it gives a
  probe text;
- every `DataConfig` field except those in `NOT_IN_KEY` (which pick or find rows, or act after
  tokenization), so a field added later is in the key until someone says it need not be;
- the code: lorakit's tokenization modules and the module of every registered row format
  (their source files' bytes), the registry's order, and the versions of tokenizers,
  transformers and jinja2 (which render chat templates).

Examples are stored as flat numpy arrays in an .npz (read with allow_pickle=False): all ids, the
offsets where each example starts, and which tokens are trained (labels are the ids there and
IGNORE_INDEX elsewhere; full labels are stored when that does not hold). A file is written to a
temporary name and renamed, so a reader never sees half a file; an unreadable file is a miss with
a note, and is replaced.

Where: $LORAKIT_CACHE_DIR/tokenized, else ~/.cache/lorakit/tokenized; LORAKIT_CACHE=off turns the
cache off. Files are never deleted by lorakit: remove the folder to reclaim the space.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import inspect
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import chain
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.data.config import DataConfig
from lorakit.data.formats import FORMATS
from lorakit.data.tokenize import Example, TokenizeStats, tokenize_rows
from lorakit.errors import ConfigError
from lorakit.labels import IGNORE_INDEX

CACHE_ENV = "LORAKIT_CACHE"  # 'off' (or 0, false, no) turns the cache off
DIR_ENV = "LORAKIT_CACHE_DIR"  # lorakit's cache folder; tokenized rows go in its 'tokenized' folder
OFF_VALUES = ("off", "0", "false", "no")
ON_VALUES = ("", "on", "1", "true", "yes")
FILE_FORMAT = 1  # bump when the layout of the .npz changes

# DataConfig fields that do not change how the given rows become examples; every other field is in the key.
NOT_IN_KEY = {
    "source": "the rows read from it are hashed",
    "subset": "the rows read from it are hashed",
    "split": "the rows read from it are hashed",
    "limit": "the rows kept are hashed",
    "shuffle": "the rows, in their order, are hashed",
    "seed": "the rows, in their order, are hashed",
    "val_source": "validation rows are hashed when they are tokenized",
    "val_split": "validation rows are hashed when they are tokenized",
    "val_fraction": "the rows kept are hashed",
    "val_limit": "the rows kept are hashed",
    "max_row_bytes": "checked when rows are read",
    "packing": "acts on the examples, after tokenization",
    "cache_dir": "where Hugging Face datasets keeps its downloads",
    "media_dir": "read only for rows with images, which are tokenized without the cache",
}
# lorakit's code between a row and an example; a change to any of these files is a new key
CODE_MODULES = ("lorakit.data.tokenize", "lorakit.data.formats", "lorakit.data.chat", "lorakit.data.rows",
                "lorakit.labels", "lorakit.data.cache")
LIBRARIES = ("tokenizers", "transformers", "jinja2")  # their versions are in the key
# init settings that say where a tokenizer was loaded from, not how it encodes
WHERE_FROM = ("name_or_path", "_name_or_path", "cache_dir", "revision", "_commit_hash", "token",
              "local_files_only", "trust_remote_code")
PROBE = "Hello world\n\n  Ünïcødé 🙂 123 <s></s>\tdone."


@dataclass
class CachedTokens:
    """What `tokenize_with_cache` did: the examples and stats, and where they came from."""

    examples: list[Example]
    stats: TokenizeStats
    hit: bool  # read from the cache
    key: str | None  # None: the cache was off or could not be used
    seconds: float  # the whole call: hashing, then reading the file or tokenizing and writing it
    tokenize_seconds: float  # how long tokenize_rows took (on a hit: when the file was written)
    path: Path | None  # the cache file (None: the cache was off)


class Uncacheable(Exception):
    """Something tokenization depends on cannot be hashed: tokenize without the cache."""


# ----------------------------------------------------------------------------- where


def cache_enabled() -> bool:
    """False when LORAKIT_CACHE says off; an unknown value is an error, not a guess."""
    value = os.environ.get(CACHE_ENV, "").strip().lower()
    if value in OFF_VALUES:
        return False
    if value in ON_VALUES:
        return True
    raise ConfigError(f"{CACHE_ENV}={os.environ[CACHE_ENV]!r}: use 'off' to turn the tokenization cache off "
                      "(or 'on', the default)")


def default_cache_dir() -> Path:
    """$LORAKIT_CACHE_DIR/tokenized, else ~/.cache/lorakit/tokenized."""
    root = os.environ.get(DIR_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lorakit") / "tokenized"


# ----------------------------------------------------------------------------- the key


def key_fields(cfg: DataConfig) -> dict[str, Any]:
    """The DataConfig fields in the key: all but NOT_IN_KEY."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_IN_KEY}


def _source_bytes(module_name: str) -> bytes:
    module = importlib.import_module(module_name)
    try:
        return Path(inspect.getsourcefile(module) or "").read_bytes()
    except (TypeError, OSError) as error:
        raise Uncacheable(f"the source of {module_name} cannot be read ({error})") from None


def code_identity() -> dict[str, Any]:
    """lorakit's tokenization code and every registered row format (the module of its renderer), hashed."""
    modules = dict.fromkeys(CODE_MODULES)
    formats = []
    for fmt in FORMATS.values():
        module = getattr(fmt.render, "__module__", None)
        if module is None:
            raise Uncacheable(f"row format {fmt.name!r}: its renderer has no module whose source could be hashed")
        modules[module] = None
        formats.append([fmt.name, list(fmt.signature), [list(s) for s in fmt.also], module,
                        getattr(fmt.render, "__qualname__", repr(fmt.render))])
    return {"files": {name: hashlib.sha256(_source_bytes(name)).hexdigest() for name in modules},
            "formats": formats, "libraries": {name: _version(name) for name in LIBRARIES}}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def _plain(value: Any) -> Any:
    """`value` with tokens and other objects as text, for JSON (settings, added tokens)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if type(value).__name__ == "AddedToken":
        return {"content": value.content, **{k: getattr(value, k, None)
                                             for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}}
    raise Uncacheable(f"a tokenizer setting of type {type(value).__name__} cannot be hashed")


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Everything about `tokenizer` that its encodings depend on, as JSON-able values."""
    kind = type(tokenizer)
    found: dict[str, Any] = {"class": f"{kind.__module__}.{kind.__qualname__}"}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        found["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        found["vocab"] = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
        model = getattr(tokenizer, "sp_model", None)
        if model is not None:
            found["sentencepiece"] = hashlib.sha256(model.serialized_model_proto()).hexdigest()
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if k not in WHERE_FROM and not k.endswith("_file") and not isinstance(v, os.PathLike)}
    found["settings"] = _plain(settings)
    found["added_tokens"] = _plain(getattr(tokenizer, "added_tokens_decoder", {}))
    found["special_tokens"] = _plain(getattr(tokenizer, "special_tokens_map", {}))
    found["special_ids"] = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")]
    found["chat_template"] = _plain(getattr(tokenizer, "chat_template", None))
    found["probe"] = [tokenizer(PROBE, add_special_tokens=special)["input_ids"] for special in (True, False)]
    return found


def _tagged(value: Any) -> Any:
    """JSON for the row values json cannot write itself (parquet and hub rows: bytes, dates)."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": value.hex()}
    if isinstance(value, (datetime.date, datetime.time)):
        return {"$" + type(value).__name__: value.isoformat()}
    raise TypeError(type(value).__name__)


def rows_digest(rows: list[Any]) -> str:
    """A hash of the rows, in order, each as canonical JSON (types kept apart: 1, 1.0, '1', true)."""
    digest = hashlib.blake2b(digest_size=20)
    for k, row in enumerate(rows):
        if isinstance(row, dict) and not all(isinstance(name, str) for name in row):
            raise Uncacheable(f"row {k + 1} has a column name that is not a string")
        try:
            text = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_tagged)
        except (TypeError, ValueError) as error:
            raise Uncacheable(f"row {k + 1} holds a value json cannot write ({error})") from None
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def cache_key(rows: list[Any], tokenizer: Any, cfg: DataConfig) -> str:
    """The hex key of (rows, tokenizer, cfg, code); raises Uncacheable when something cannot be hashed."""
    parts = {"file_format": FILE_FORMAT, "code": code_identity(), "config": _plain(key_fields(cfg)),
             "tokenizer": tokenizer_identity(tokenizer), "rows": rows_digest(rows)}
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()


# ----------------------------------------------------------------------------- the file


def write_examples(path: Path, key: str, examples: list[Example], stats: TokenizeStats, seconds: float) -> None:
    """Save examples and stats as arrays in one .npz at `path`, atomically (temporary file, then rename)."""
    offsets = np.cumsum([0] + [len(e["input_ids"]) for e in examples], dtype=np.int64)
    ids, labels = (np.fromiter(chain.from_iterable(e[field] for e in examples), dtype=np.int64, count=int(offsets[-1]))
                   for field in ("input_ids", "labels"))
    small = ids.size == 0 or (ids.min() >= np.iinfo(np.int32).min and ids.max() <= np.iinfo(np.int32).max)
    trained = labels != IGNORE_INDEX
    arrays = {"input_ids": ids.astype(np.int32) if small else ids, "offsets": offsets}
    if np.array_equal(labels[trained], ids[trained]):  # labels are the ids where trained: one byte per token
        arrays["trained"] = trained
    else:
        arrays["labels"] = labels
    meta = {"file_format": FILE_FORMAT, "key": key, "stats": asdict(stats), "tokenize_seconds": seconds}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_examples(path: Path, key: str) -> tuple[list[Example], TokenizeStats, float]:
    """(examples, stats, tokenize seconds) from a file `write_examples` wrote; ValueError when it is not one."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
        if meta.get("file_format") != FILE_FORMAT or meta.get("key") != key:
            raise ValueError(f"it holds key {str(meta.get('key'))[:12]}, file format {meta.get('file_format')}")
        offsets = archive["offsets"]
        ids = archive["input_ids"].astype(np.int64)
        labels = archive["labels"] if "labels" in archive.files else np.where(archive["trained"], ids, IGNORE_INDEX)
    stats = TokenizeStats(**meta["stats"])
    if offsets[0] != 0 or offsets[-1] != ids.size or labels.shape != ids.shape or np.any(np.diff(offsets) < 0) \
            or len(offsets) != stats.n_examples + 1:
        raise ValueError("its arrays do not fit together")
    id_list, label_list, bounds = ids.tolist(), labels.tolist(), offsets.tolist()
    examples = [{"input_ids": id_list[start:end], "labels": label_list[start:end]}
                for start, end in zip(bounds[:-1], bounds[1:])]
    return examples, stats, float(meta["tokenize_seconds"])


# ----------------------------------------------------------------------------- the call


def tokenize_with_cache(rows: list[Any], tokenizer: Any, cfg: DataConfig, cache_dir: str | Path | None = None,
                        *, log: Callable[[str], None] = print) -> CachedTokens:
    """`tokenize_rows(rows, tokenizer, cfg)` through the cache in `cache_dir` (None: `default_cache_dir()`).

    Logs one line: where the examples came from, and how long tokenizing took. Errors in the rows
    are raised as tokenize_rows raises them (nothing is cached then).
    """
    start = time.perf_counter()
    if not rows:
        examples, stats = tokenize_rows(rows, tokenizer, cfg)
        return CachedTokens(examples, stats, hit=False, key=None, seconds=0.0, tokenize_seconds=0.0, path=None)
    key, path, where = None, None, "cache off: LORAKIT_CACHE=off"
    if cache_enabled():
        try:
            key = cache_key(rows, tokenizer, cfg)
        except Uncacheable as error:
            where = "not cached"
            log(f"data: note: tokenizing without the cache: {error}")
        else:
            path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / f"{key}.npz"
            hit = _read(path, key, log)
            if hit is not None:
                log(f"data: tokenized rows from the cache (key {key[:12]}; LORAKIT_CACHE=off to recompute)")
                return CachedTokens(hit[0], hit[1], hit=True, key=key, seconds=time.perf_counter() - start,
                                    tokenize_seconds=hit[2], path=path)
    began = time.perf_counter()
    examples, stats = tokenize_rows(rows, tokenizer, cfg)
    tokenize_seconds = time.perf_counter() - began
    if path is not None:
        where = _write(path, key, examples, stats, tokenize_seconds, log)
    log(f"data: tokenized {len(rows):,} rows in {tokenize_seconds:.1f} s ({where})")
    return CachedTokens(examples, stats, hit=False, key=key, seconds=time.perf_counter() - start,
                        tokenize_seconds=tokenize_seconds, path=path)


def _read(path: Path, key: str, log: Callable[[str], None]) -> tuple[list[Example], TokenizeStats, float] | None:
    """The cached examples at `path`, or None (absent, or unreadable: said in a note, then replaced)."""
    if not path.exists():
        return None
    try:
        return read_examples(path, key)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        log(f"data: note: the tokenization cache file {path} is unreadable ({type(error).__name__}: {error}); "
            "tokenizing again and replacing it")
        return None


def _write(path: Path, key: str, examples: list[Example], stats: TokenizeStats, seconds: float,
           log: Callable[[str], None]) -> str:
    """Write the cache file; where the examples went, for the log line (a failure is a note, not an error)."""
    try:
        write_examples(path, key, examples, stats, seconds)
    except OSError as error:
        log(f"data: note: could not write the tokenization cache {path} ({type(error).__name__}: {error})")
        return "not cached"
    return f"cached as key {key[:12]} in {path.parent}"


def cached_tokenize(rows: list[Any], tokenizer: Any, cfg: DataConfig, cache_dir: str | Path | None = None,
                    *, log: Callable[[str], None] = print) -> tuple[list[Example], TokenizeStats]:
    """(examples, stats), equal to `tokenize_rows(rows, tokenizer, cfg)`'s, through the cache."""
    result = tokenize_with_cache(rows, tokenizer, cfg, cache_dir, log=log)
    return result.examples, result.stats
