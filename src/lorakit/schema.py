"""Typed dataclasses <-> plain dicts: coercion, unknown-key errors, field docs.

The config system and the CLI are built from the dataclasses the rooms already define
(`DataConfig`, `TrainConfig`, the adapter method configs); this module is the generic part:

- `from_dict(cls, raw, prefix)` builds a dataclass from a YAML/CLI mapping, coercing each value
  to the field's annotated type; an unknown key is a `ConfigError` naming the closest valid key.
- `to_dict(obj)` is the inverse (plain YAML-safe values), so load -> dump -> load is lossless.
- `type_name(tp)` spells an annotation for `--help` (the docs come from `lorakit.fielddocs`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Union

from lorakit.errors import ConfigError, LorakitError

_NULL_WORDS = {"null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def closest(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to dotted `key` (None when nothing is reasonably close).

    Within a known section only the last parts are compared ('data.max_lenght' ->
    'data.max_length'); a typo in the section itself is matched on the whole key.
    """
    candidates = list(candidates)
    section, _, leaf = key.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == section}
    if siblings:
        match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        return siblings[match[0]] if match else None
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_error(key: str, valid: Iterable[str], context: str = "") -> ConfigError:
    """The error for an unknown key, naming the closest valid one."""
    valid = sorted(valid)
    guess = closest(key, valid)
    where = f" {context}" if context else ""
    if guess:
        return ConfigError(f"unknown key '{key}'{where}; did you mean '{guess}'?")
    return ConfigError(f"unknown key '{key}'{where}; valid keys: {', '.join(valid)}")


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (strings from `__future__` resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    """A short readable name for an annotation, e.g. 'float', 'str | list[str]'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- coercion


def _fail(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


def _coerce_scalar(value: Any, tp: type, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _fail(key, tp, value) from None
            if number.is_integer():
                return int(number)
        raise _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _fail(key, tp, value)
    if tp in (str, Path):
        if isinstance(value, (str, Path)) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return tp(value)
        raise _fail(key, tp, value)
    if isinstance(value, tp):
        return value
    raise _fail(key, tp, value)


def _parse_yaml_text(value: Any) -> Any:
    """A CLI string such as '[a, b]' or '{x: 1}' becomes the YAML value it spells."""
    import yaml

    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def _union_order(option: Any) -> int:
    """Try plain scalars first, then str (the loosest), then containers: for `int | str`, '8' is 8;
    for `str | list[str]`, 'all-linear' stays a string."""
    if option in (str, Path):
        return 1
    if option in (bool, int, float) or typing.get_origin(option) is Literal:
        return 0
    return 2


def _coerce_union(value: Any, args: tuple, key: str, tp: Any) -> Any:
    if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS)):
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # `X | None`: X's own, more specific, message
        return coerce(value, options[0], key)
    value = _parse_yaml_text(value)
    for option in sorted(options, key=_union_order):
        try:
            return coerce(value, option, key)
        except ConfigError:
            continue
    raise _fail(key, tp, value)


def _coerce_sequence(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    value = _parse_yaml_text(value)
    if isinstance(value, str):  # CLI form: a,b,c
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise _fail(key, tp, value)
    item_type = args[0] if args else Any
    items = [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_mapping(value: Any, tp: Any, key: str) -> dict:
    args = typing.get_args(tp)
    value = _parse_yaml_text(value)
    if not isinstance(value, Mapping):
        raise _fail(key, tp, value)
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    return {coerce(k, key_type, key): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the annotated type `tp`, or raise ConfigError."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, key, tp)
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None
        raise _fail(key, tp, value)
    if origin is Literal:
        for option in args:
            try:
                if coerce(value, type(option), key) == option:
                    return option
            except ConfigError:
                continue
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin in (list, tuple, set, typing.Sequence) or tp in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin in (dict, typing.Mapping) or tp is dict:
        return _coerce_mapping(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, _parse_yaml_text(value), key)
    if value is None:
        raise ConfigError(f"{key}: a value is required (expected {type_name(tp)})")
    return _coerce_scalar(value, tp, key)


# ----------------------------------------------------------------------------- dict round-trip


def leaf_keys(value: Any, prefix: str) -> list[str]:
    """Dotted keys of every leaf under a nested mapping, e.g. ['train.lr', 'train.epochs']."""
    if isinstance(value, Mapping) and value:
        return [k for name, v in value.items() for k in leaf_keys(v, f"{prefix}.{name}")]
    return [prefix]


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping; keys are checked, values coerced to field types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = type_hints(cls)
    for name in raw:
        if name not in hints:
            raise unknown_key_error(f"{prefix}.{name}", [f"{prefix}.{k}" for k in hints])
    kwargs = {name: coerce(value, hints[name], f"{prefix}.{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except LorakitError:
        raise
    except (TypeError, ValueError) as exc:  # a missing required field, or the class's own check
        raise ConfigError(f"{prefix}: {exc}") from None


def to_plain(value: Any) -> Any:
    """A YAML-safe copy: dataclasses -> dicts, tuples -> lists, paths -> strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
