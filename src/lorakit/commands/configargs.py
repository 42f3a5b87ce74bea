"""A run config from the command line: `[CONFIG] [--section.key VALUE | section.key=VALUE ...]`.

`add_config_arguments` registers one `--section.key` option per config field (so `--help`
lists every field with its doc and default), and a hidden one per alias (`--learning_rate`,
`--train.learning_rate`; lorakit.config.ALIASES); `config_from_args` turns the parsed words into a
`RunConfig`. Every unknown key, in either form and in the YAML, is reported in one error naming the
closest valid key or alias.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

from lorakit.config import (TOP_LEVEL, RunConfig, Schema, apply_overrides, build_config, default_schema, find_recipe,
                            is_recipe, read_yaml)
from lorakit.errors import ConfigError
from lorakit.fielddocs import field_default, field_docs
from lorakit.schema import UnknownKey, UnknownKeysError, type_hints, type_name, unknown_keys_error

_KEY_VALUE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)$", re.S)
CONFIG_FILE = "config.yaml"


class _Override(argparse.Action):
    """Collects `--section.key VALUE` as ("section.key", "VALUE") in `namespace.overrides`."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        collected = list(getattr(namespace, "overrides", None) or [])
        collected.append((self.dest.removeprefix("override:"), values))
        setattr(namespace, "overrides", collected)


def _help(doc: str, default: Any) -> str:
    text = doc.replace("%", "%%")
    if default is not dataclasses.MISSING:
        text += f" (default: {_shown(default)})".replace("%", "%%")
    return text


def _metavar(tp: Any) -> str:
    """INT, FLOAT, BOOL, STR or {a,b} for simple (optional) types; VALUE (YAML text) otherwise."""
    simple = {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else None
    if typing.get_origin(tp) is Literal:
        return type_name(tp)
    return simple.get(tp, "VALUE")


def _shown(default: Any) -> str:
    """A default as it is written in YAML: null, true, 'text', [..]."""
    if default is None or isinstance(default, bool):
        return {None: "null", True: "true", False: "false"}[default]
    return repr(default)


def _add_option(group: argparse._ArgumentGroup, key: str, tp: Any, doc: str, default: Any) -> None:
    # Every option takes a value (booleans too: --train.compile true), so an option can never
    # swallow the CONFIG word that follows it.
    group.add_argument(f"--{key}", dest=f"override:{key}", action=_Override, default=argparse.SUPPRESS,
                       metavar=_metavar(tp), help=_help(doc, default))


def _add_dataclass(group: argparse._ArgumentGroup, prefix: str, cls: type) -> None:
    hints, docs = type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            _add_option(group, f"{prefix}.{f.name}", hints[f.name], docs[f.name], field_default(f))


def _add_method_options(parser: argparse.ArgumentParser, schema: Schema) -> None:
    group = parser.add_argument_group(
        "method", "method.name picks the adaptation method; the other keys are that method's fields "
                  "(the methods that have a key are listed in brackets).")
    group.add_argument("--method", dest="override:method", action=_Override, default=argparse.SUPPRESS,
                       metavar="{" + ",".join(schema.methods) + "}",
                       help="switch to this method with its defaults, dropping the config file's method keys")
    group.add_argument("--method.name", dest="override:method.name", action=_Override, default=argparse.SUPPRESS,
                       metavar="{" + ",".join(schema.methods) + "}",
                       help=f"the method; its keys follow (default: {schema.default_method!r})")
    seen: dict[str, list[str]] = {}
    first: dict[str, tuple[Any, str, Any]] = {}
    for method, cls in schema.methods.items():
        hints, docs = type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                seen.setdefault(f.name, []).append(method)
                first.setdefault(f.name, (hints[f.name], docs[f.name], field_default(f)))
    for name, methods in seen.items():
        tp, doc, default = first[name]
        _add_option(group, f"method.{name}", tp, f"[{', '.join(methods)}] {doc}", default)


def add_config_arguments(parser: argparse.ArgumentParser, schema: Schema | None = None) -> None:
    """Register CONFIG, KEY=VALUE words and one `--key` option per field of every section."""
    schema = schema or default_schema()
    parser.allow_abbrev = False  # `--train.l` must not silently mean `--train.lr`
    parser.usage = f"{parser.prog} [-h] [options] [CONFIG] [--section.key VALUE | section.key=VALUE ...]"
    parser.set_defaults(overrides=[])
    parser.add_argument("words", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                        help="a YAML config (a file, a run folder, or a shipped recipe name; default: "
                             "quickstart), then overrides as dotted key=value pairs")
    run = parser.add_argument_group("run", "where the run folder goes")
    hints, docs = type_hints(RunConfig), field_docs(RunConfig)
    for key in TOP_LEVEL:
        default = next(f.default for f in dataclasses.fields(RunConfig) if f.name == key)
        _add_option(run, key, hints[key], docs[key], default)
    for section, cls in schema.sections.items():
        _add_dataclass(parser.add_argument_group(section, (cls.__doc__ or "").split("\n")[0]), section, cls)
        if section == "model":  # --help follows the order of a config file: model, method, data, train
            _add_method_options(parser, schema)
    registered = {option for action in parser._actions for option in action.option_strings}
    for spelled in schema.spellings():  # hidden: the README lists them, and each use prints a note
        if f"--{spelled}" not in registered:
            parser.add_argument(f"--{spelled}", dest=f"override:{spelled}", action=_Override,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _option_key(word: str) -> str:
    return word.lstrip("-").split("=", 1)[0]


def split_words(words: Sequence[str], extra: Sequence[str], schema: Schema) -> tuple[str | None, list[tuple[str, str]]]:
    """(config path or None, key=value overrides) from positional words and unparsed extras; unknown
    --options (argparse leaves them in `extra`) are one error naming the closest key of each."""
    stray = [_option_key(word) for word in extra if word.startswith("-")]
    if stray:
        everything = tuple(schema.keys())
        raise unknown_keys_error([UnknownKey(key, everything) for key in stray], aliases=schema.spellings())
    config, overrides = None, []
    for index, word in enumerate([*words, *extra]):
        match = _KEY_VALUE.match(word)
        if match:
            overrides.append((match.group(1), match.group(2)))
        elif index == 0:
            config = word
        else:
            raise ConfigError(f"unexpected argument '{word}': overrides are written key=value or --key value")
    return config, overrides


def _check_duplicates(overrides: Sequence[tuple[str, Any]]) -> None:
    seen: dict[str, Any] = {}
    for key, value in overrides:
        if key in seen and seen[key] != value:
            raise ConfigError(f"'{key}' is given twice ({seen[key]!r} and {value!r})")
        seen[key] = value


def config_source(config: str | None, resume: bool = False) -> Path:
    """The YAML file behind a CONFIG word: a file, a run folder's config.yaml, or a recipe name. With
    `resume`, a word that names none of them (and is no .yaml path) is a run folder that does not exist."""
    if config is not None and Path(config).is_dir():
        path = Path(config) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"'{config}' is a folder without a {CONFIG_FILE}")
        return path
    try:
        return find_recipe(config if config is not None else "quickstart")
    except ConfigError:
        if resume and Path(config).suffix not in (".yaml", ".yml"):
            raise ConfigError(f"cannot resume: run folder '{config}' does not exist") from None
        raise


def _unknown_options_error(args: argparse.Namespace, stray: list[str], schema: Schema) -> ConfigError:
    """The one error for unknown --options, with the unknown keys of the YAML and key=value words too.

    argparse cannot tell an unknown option's value from a positional word, so the config file is the
    first word that names one (the values of unknown options do not matter: they are not read)."""
    words = [*getattr(args, "words", []), *(w for w in getattr(args, "extra", []) if not w.startswith("-"))]
    pairs = [(m.group(1), m.group(2)) for m in map(_KEY_VALUE.match, words) if m]
    raw: dict = {}
    for word in (w for w in words if not _KEY_VALUE.match(w)):
        try:
            raw = read_yaml(config_source(word))
            break
        except ConfigError:
            continue
    try:
        build_config(apply_overrides(raw, [*getattr(args, "overrides", []), *pairs, *((k, None) for k in stray)],
                                     schema), schema)
    except UnknownKeysError as error:
        return error
    except ConfigError:  # a bad value, an alias given twice, ...: the unknown options come first
        pass
    return unknown_keys_error([UnknownKey(key, tuple(schema.keys())) for key in stray], aliases=schema.spellings())


def config_from_args(args: argparse.Namespace, schema: Schema | None = None) -> tuple[RunConfig, Path]:
    """(RunConfig, the YAML file it came from) for a parsed command line.

    The YAML is read, the overrides are applied, then everything is validated. `name` stays
    None when neither the file nor the overrides set it (the caller derives one).
    """
    schema = schema or default_schema()
    stray = [_option_key(word) for word in getattr(args, "extra", []) if word.startswith("-")]
    if stray:
        raise _unknown_options_error(args, stray, schema)
    config, words = split_words(getattr(args, "words", []), getattr(args, "extra", []), schema)
    overrides = [*getattr(args, "overrides", []), *words]
    _check_duplicates(overrides)
    source = config_source(config, resume=getattr(args, "resume", False))
    return build_config(apply_overrides(read_yaml(source), overrides, schema, recipe=is_recipe(source)), schema), source
