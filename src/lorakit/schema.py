"""Config fields, declared once and checked the same way from YAML, the command line and Python.

The one way to declare a config field
-------------------------------------
A config section is a dataclass that subclasses `Config` and names its `section`; each field is a
`setting(default, doc, <checks>)`: its default, its help text (`--help` shows it) and its range::

    @dataclass
    class TrainConfig(Config):
        section: ClassVar[str] = "train"
        lr: float = setting(2e-4, "Peak learning rate of AdamW.", gt=0)

Checks: `gt`, `ge`, `lt`, `le` (applied to each item of a list or tuple), `choices` (a collection,
or a zero-argument callable for a registry imported on first use) and `nonempty`; None always
passes them (write `X | None` to allow it). Static choices are a `Literal[...]` annotation instead.
A mutable default is `factory=list` (or `factory=dict`). Rules that involve several fields go in a
`problems()` method returning `[(field, message)]`. A class that needs its own `__post_init__`
calls `super().__post_init__()` first. Nothing else: no attribute docstrings, no hand-written
`__post_init__` checks, no isinstance checks (the annotation does that).

`Config.__post_init__` runs `validate(self)`: every field is coerced to its annotation (so
`TrainConfig(lr="3e-4")` holds 3e-4, as `train.lr: 3e-4` in YAML or `--train.lr 3e-4` would), its
declared checks run, then `problems()`. The first problem is a `ConfigError` of one shape, from
every path: `train.lr: must be > 0 (got 0.0)`. A subclass inherits its parent's settings and checks
(DoRA(LoRA)); a method config sets `section = "method"` beside its registry `name`.

The rest of this module is the generic part the config system and the CLI are built on:

- `from_dict(cls, raw, prefix)` builds a dataclass from a YAML/CLI mapping; unknown keys are one
  `ConfigError` naming, for each, the closest valid key or alias (`unknown_keys_error`). A `Config`
  coerces and checks itself; the fields of a plain dataclass are coerced here.
- `to_plain(obj)` is the inverse (plain YAML-safe values), so load -> dump -> load is lossless.
- `type_name(tp)` spells an annotation for `--help` (the docs come from `lorakit.fielddocs`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Iterable, Literal, Mapping, Union

import yaml

from lorakit.errors import ConfigError, LorakitError

HELP = "help"  # Field.metadata key of a setting's doc
CHECK = "check"  # Field.metadata key of a setting's `Check`

_NULL_WORDS = {"null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}
_SHOWN = reprlib.Repr()  # a bad value as quoted in an error message: a list of a million rows is not spelt out
_SHOWN.maxstring = _SHOWN.maxother = 120
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 8


def shown(value: Any) -> str:
    """`repr(value)`, cut short for a message."""
    return _SHOWN.repr(value)


def problem(key: str, message: str, value: Any) -> ConfigError:
    """The one shape of a bad-value error: `train.lr: must be > 0 (got 0.0)`."""
    return ConfigError(f"{key}: {message} (got {shown(value)})")


# ----------------------------------------------------------------------------- declaring fields


def _number(bound: float) -> str:
    return str(int(bound)) if isinstance(bound, float) and bound.is_integer() else str(bound)


@dataclasses.dataclass(frozen=True)
class Check:
    """The declared range and choices of one field (`setting(gt=..., choices=...)`)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: Collection[Any] | Callable[[], Collection[Any]] | None = None
    nonempty: bool = False

    def options(self) -> tuple[Any, ...]:
        """The allowed values (a callable `choices` is asked now, so a registry can grow)."""
        return tuple(self.choices() if callable(self.choices) else self.choices or ())

    def range_text(self) -> str:
        """'must be > 0', 'must be in [0, 1)', ... ('' when no bound is declared)."""
        low = (">", self.gt) if self.gt is not None else (">=", self.ge) if self.ge is not None else None
        high = ("<", self.lt) if self.lt is not None else ("<=", self.le) if self.le is not None else None
        if low and high:
            return (f"must be in {'(' if low[0] == '>' else '['}{_number(low[1])}, "
                    f"{_number(high[1])}{')' if high[0] == '<' else ']'}")
        if low or high:
            sign, bound = low or high  # type: ignore[misc]
            return f"must be {sign} {_number(bound)}"
        return ""

    def _in_range(self, value: Any) -> bool:
        try:
            return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                    and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        except TypeError:
            return False

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (None when it passes; None itself always passes)."""
        if value is None:
            return None
        if self.nonempty and hasattr(value, "__len__") and len(value) == 0:
            return "must not be empty"
        if self.choices is not None and value not in (options := self.options()):
            return f"must be one of {', '.join(map(str, options))}"
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(bound is not None for bound in (self.gt, self.ge, self.lt, self.le)) \
                and not all(self._in_range(item) for item in items):
            return self.range_text()
        return None


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
            gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
            choices: Collection[Any] | Callable[[], Collection[Any]] | None = None,
            nonempty: bool = False) -> Any:
    """A config field: its default (or `factory`), its help text and its declared checks.

    Returns a `dataclasses.Field`; the doc is `metadata["help"]`, the checks `metadata["check"]`.
    """
    if factory is not None and default is not dataclasses.MISSING:
        raise TypeError("setting: give a default or a factory, not both")
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"setting: a mutable default ({default!r}) must be a factory, e.g. factory=list")
    metadata: dict[str, Any] = {HELP: " ".join(doc.split())}
    check = Check(gt=gt, ge=ge, lt=lt, le=le, choices=choices, nonempty=nonempty)
    if check != Check():
        metadata[CHECK] = check
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Config:
    """Base of every config section: coerces and checks its fields on construction (see above)."""

    section: ClassVar[str] = ""  # the YAML section, e.g. "train"; "" for top-level keys

    def __post_init__(self) -> None:
        validate(self)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field rules: (field, message) for each one broken (none by default)."""
        return []


_SPECS: dict[type, tuple[tuple[str, str, Any, Check | None], ...]] = {}


def _spec(cls: type) -> tuple[tuple[str, str, Any, Check | None], ...]:
    """(name, error key, type, check) of each init field of `cls`, worked out once per class."""
    spec = _SPECS.get(cls)
    if spec is None:
        section = getattr(cls, "section", "")
        hints = type_hints(cls)
        spec = tuple((f.name, f"{section}.{f.name}" if section else f.name, hints[f.name], f.metadata.get(CHECK))
                     for f in dataclasses.fields(cls) if f.init)
        _SPECS[cls] = spec
    return spec


def validate(obj: Any) -> None:
    """Coerce each field of dataclass `obj` to its annotation in place, run its declared checks and
    its `problems()`; raise `ConfigError("section.field: message (got value)")` for the first."""
    cls = type(obj)
    for name, key, tp, check in _spec(cls):
        value = getattr(obj, name)
        coerced = coerce(value, tp, key)
        if coerced is not value:
            object.__setattr__(obj, name, coerced)  # frozen configs too
        message = check.problem(coerced) if check is not None else None
        if message:
            raise problem(key, message, coerced)
    hook = getattr(obj, "problems", None)
    for name, message in (hook() if callable(hook) else ()):
        section = getattr(cls, "section", "")
        key = f"{section}.{name}" if section else name
        if name in {f.name for f in dataclasses.fields(cls)}:
            raise problem(key, message, getattr(obj, name))
        raise ConfigError(f"{key}: {message}")


# ----------------------------------------------------------------------------- keys and names


def _near(word: str, options: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def closest(key: str, candidates: Iterable[str], elsewhere: Iterable[str] = ()) -> str | None:
    """The candidate most similar to dotted `key` (None when nothing is reasonably close).

    A key of another section among `candidates` and `elsewhere` with the very same last part comes first: the
    key was put in the wrong section ('train.max_length' -> 'data.max_length', though train has
    max_completion_length); else, within the key's section, the closest last part ('data.max_lenght' ->
    'data.max_length'); else the most similar whole key ('trian.lr' -> 'train.lr').
    """
    candidates = list(candidates)
    section, _, leaf = key.rpartition(".")
    others = [c for c in [*candidates, *elsewhere] if c.rpartition(".")[0] != section]
    same_leaf = [c for c in others if c.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == section}
    match = _near(leaf, siblings)
    return siblings[match] if match is not None else _near(key, others)


class UnknownKeysError(ConfigError):
    """Keys that no field matches (each named with its closest valid key)."""


@dataclasses.dataclass(frozen=True)
class UnknownKey:
    """A key that no field matches: as written (dotted), the valid keys where it stands, and where that is."""

    key: str
    valid: tuple[str, ...]
    context: str = ""  # e.g. "for method 'lora'"


def _hint(entry: UnknownKey, elsewhere: Iterable[str], aliases: Mapping[str, str]) -> str:
    """'did you mean ...?' for one unknown key, or the valid keys where it stands."""
    whole = [key for key in entry.valid if entry.key.startswith(key + ".")]
    if whole:  # a key inside a mapping-valued field (method.modalities.image.r): the field is set as one mapping
        return (f"'{whole[0]}' is one mapping, set as a whole (in YAML, or on the command line as "
                f"--{whole[0]} '{{...}}'); the keys inside it are not config keys")
    own_aliases = [alias for alias, key in aliases.items() if key in entry.valid]
    guess = closest(entry.key, [*entry.valid, *own_aliases], [*elsewhere, *aliases])
    if guess is None or guess == entry.key:
        return f"valid keys: {', '.join(sorted(entry.valid))}"
    if guess in aliases:
        return f"did you mean '{aliases[guess]}' (alias '{guess.rpartition('.')[2]}')?"
    return f"did you mean '{guess}'?"


def unknown_keys_error(unknown: Iterable[UnknownKey], elsewhere: Iterable[str] = (),
                       aliases: Mapping[str, str] | None = None) -> UnknownKeysError:
    """One error for every unknown key, each with the closest valid key or the valid keys where it stands.

    `elsewhere`: the valid keys of other sections (a key put in the wrong one is found there); `aliases`:
    accepted spellings -> the key they stand for ('train.learning_rate' -> 'train.lr'), suggested by the
    key they stand for."""
    elsewhere, aliases = tuple(elsewhere), dict(aliases or {})
    hints = [(entry, _hint(entry, elsewhere, aliases)) for entry in unknown]
    if len(hints) == 1:
        entry, hint = hints[0]
        where = f" {entry.context}" if entry.context else ""
        return UnknownKeysError(f"unknown key '{entry.key}'{where}; {hint}")
    parts = [f"'{entry.key}'{' ' + entry.context if entry.context else ''}: {hint}" for entry, hint in hints]
    return UnknownKeysError(f"{len(parts)} unknown keys: " + "; ".join(parts))


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (strings from `__future__` resolved).

    Resolved once per class (`typing.get_type_hints` is slow and this is asked for every object
    built); each call returns a fresh dict.
    """
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = _HINTS[cls] = {f.name: resolved.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    return dict(hints)


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
    return problem(key, f"expected {type_name(tp)}", value)


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
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _fail(key, tp, value)
    if tp in (str, Path):
        if type(value) is tp:
            return value
        if isinstance(value, (str, Path)) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return tp(value)
        raise _fail(key, tp, value)
    if isinstance(value, tp):
        return value
    raise _fail(key, tp, value)


def _parse_yaml_text(value: Any) -> Any:
    """A CLI string such as '[a, b]' or '{x: 1}' becomes the YAML value it spells."""
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
    if origin is tuple and args and Ellipsis not in args:  # tuple[float, float]: exactly two
        if len(value) != len(args):
            raise _fail(key, tp, value)
        items = [coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args))]
    else:
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    kind = tuple if origin is tuple or tp is tuple else list
    if type(value) is kind and all(new is old for new, old in zip(items, value)):
        return value  # already typed: keep the caller's object (rows in memory are not copied)
    return kind(items)


def _coerce_mapping(value: Any, tp: Any, key: str) -> dict:
    args = typing.get_args(tp)
    value = _parse_yaml_text(value)
    if not isinstance(value, Mapping):
        raise _fail(key, tp, value)
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    items = [(k, coerce(k, key_type, key), v, coerce(v, value_type, f"{key}.{k}")) for k, v in value.items()]
    if type(value) is dict and all(k is new_k and v is new_v for k, new_k, v, new_v in items):
        return value
    return {new_k: new_v for _, new_k, _, new_v in items}


_EXACT_SCALARS = (bool, int, float, str)


@functools.lru_cache(maxsize=None)
def _exact(tp: Any) -> Callable[[Any], bool] | None:
    """A fast test for "`value` has type `tp` already, so `coerce` would return it unchanged"
    (None for annotations where only `coerce` itself can tell: Literal, dataclasses, most unions)."""
    if tp is Any or tp is object:
        return lambda value: True
    if tp in _EXACT_SCALARS:
        return lambda value: type(value) is tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _exact(options[0]) if len(options) == 1 else None  # `X | None` only: a wider union may convert
        if inner is None:
            return (lambda value: value is None) if type(None) in args else None
        if options[0] in (str, Path):  # 'null' given for `str | None` (the command line's spelling) is None
            return lambda value: value is None or (inner(value) and str(value).strip().lower() not in _NULL_WORDS)
        return lambda value: value is None or inner(value)
    if origin is list and len(args) == 1 and (item := _exact(args[0])) is not None:
        if args[0] is Any:
            return lambda value: type(value) is list
        return lambda value: type(value) is list and all(map(item, value))
    if origin is dict and len(args) == 2 and (key := _exact(args[0])) and (val := _exact(args[1])):
        if args[1] is Any:
            return lambda value: type(value) is dict and all(map(key, value))
        return lambda value: type(value) is dict and all(map(key, value)) and all(map(val, value.values()))
    if origin is tuple and args and Ellipsis not in args:
        checks = [_exact(a) for a in args]
        if all(checks):
            return lambda value: (type(value) is tuple and len(value) == len(checks)
                                  and all(check(v) for check, v in zip(checks, value)))
    return None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML, command-line or Python value to the annotated type `tp`, or raise ConfigError.

    A value that already has the type comes back as the same object."""
    try:
        exact = _exact(tp)
    except TypeError:  # an unhashable annotation: take the long way
        exact = None
    if exact is not None and exact(value):
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
        raise problem(key, f"must be one of {', '.join(map(str, args))}", value)
    if origin in (list, tuple, set, typing.Sequence) or tp in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin in (dict, typing.Mapping) or tp is dict:
        return _coerce_mapping(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # built (and checked) already
            return value
        return from_dict(tp, _parse_yaml_text(value), key)
    if value is None:
        raise _fail(key, tp, value)
    return _coerce_scalar(value, tp, key)


# ----------------------------------------------------------------------------- dict round-trip


def leaf_keys(value: Any, prefix: str) -> list[str]:
    """Dotted keys of every leaf under a nested mapping, e.g. ['train.lr', 'train.epochs']."""
    if isinstance(value, Mapping) and value:
        return [k for name, v in value.items() for k in leaf_keys(v, f"{prefix}.{name}")]
    return [prefix]


def unknown_keys(cls: type, raw: Mapping, prefix: str, context: str = "",
                 also_valid: Iterable[str] = ()) -> list[UnknownKey]:
    """The keys of `raw` that are no init field of `cls` (`also_valid`: keys the caller has taken out
    already, listed as valid, e.g. a method's `name`)."""
    fields = type_hints(cls)
    valid = tuple(f"{prefix}.{k}" for k in [*fields, *also_valid])
    return [UnknownKey(f"{prefix}.{name}", valid, context) for name in raw if name not in fields]


def check_keys(cls: type, raw: Mapping, prefix: str, context: str = "", also_valid: Iterable[str] = ()) -> None:
    """Raise one error for the keys of `raw` that are no init field of `cls`, naming the closest valid keys."""
    unknown = unknown_keys(cls, raw, prefix, context, also_valid)
    if unknown:
        raise unknown_keys_error(unknown)


def from_dict(cls: type, raw: Any, prefix: str, *, context: str = "", also_valid: Iterable[str] = ()) -> Any:
    """Build dataclass `cls` from a mapping: keys are checked here (see `check_keys`), values are
    coerced and checked by the class itself (a `Config`), or coerced here (a plain dataclass)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise problem(prefix, f"expected a mapping of {cls.__name__} fields", raw)
    check_keys(cls, raw, prefix, context, also_valid)
    if issubclass(cls, Config):
        kwargs = dict(raw)
    else:
        hints = type_hints(cls)
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
