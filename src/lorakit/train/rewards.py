"""Rewards for reinforcement learning with verifiable rewards (GRPO): built-ins, user callables, weighted scores.

A reward scores a batch of completions: `reward(prompts, completions, rows) -> list[float]`, one number per
completion, where `rows[i]` is the dataset row that `prompts[i]` came from (so a reward can read its reference
answer, e.g. rows[i]["answer"]). The config lists rewards as `train.rewards`; each entry is a built-in's name,
`"module:function"` (a user callable with the signature above, imported from the current directory or
sys.path), or a mapping {"name": ..., "weight": 1.0, options...}. A completion's reward is the weighted sum.

Built-ins (each returns 1.0 or 0.0 unless said otherwise; "the answer" is str(row[field]), field "answer"
unless the mapping sets `field`; a completion is the decoded text after the prompt, up to and not including
the stop token, as the rollout returns it: nothing is cut at a newline or elsewhere):

    exact_match     the whole completion equals the answer. With normalize (the default) both are trimmed,
                    runs of whitespace become one space and case is folded (`normalize`), the same comparison
                    as `lorakit evaluate`'s exact match; normalize: false compares the raw strings.
    contains        the answer occurs inside the completion (normalized both, unless normalize: false).
    regex           re.search(pattern, completion) finds a match in the raw completion (option `pattern`,
                    Python `re` syntax; inline flags such as (?i) work).
    length_penalty  0 for a completion of at most target_length characters; beyond it falls linearly to -1 at
                    max_length characters, and is -1 past max_length (DAPO's soft overlong punishment, Yu et al.
                    2025, eq. 13, in characters since a reward sees text). max_length defaults to
                    target_length: then every completion longer than target_length gets -1.

Mistakes in the list are ConfigErrors naming the entry ("train.rewards[1]: ..."); a reward that raises or
returns something other than one finite number per completion is a LorakitError from `score` naming the
reward and the completion.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import ConfigError, DataError, LorakitError

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


def normalize(text: str) -> str:
    """Trim, collapse runs of whitespace to one space, and case-fold."""
    return " ".join(text.split()).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    """True when the normalised prediction equals the normalised reference."""
    return normalize(prediction) == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    """True when the normalised reference occurs inside the normalised prediction."""
    return normalize(reference) in normalize(prediction)


@dataclass(frozen=True)
class Reward:
    """A named reward callable; `name` ("exact_match", "my_mod:score") is how errors and metrics call it."""

    name: str
    fn: RewardFn

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> Sequence[float]:
        return self.fn(prompts, completions, rows)


# ----------------------------------------------------------------------------- built-ins


def answer_of(row: Mapping, field: str, index: int) -> str:
    """The reference answer str(row[field]) of completion `index`'s row, or a DataError naming the field."""
    value = row.get(field) if isinstance(row, Mapping) else None
    if not isinstance(value, (str, numbers.Real)):
        found = "has no field" if value is None else f"has a {type(value).__name__} in field"
        raise DataError(f"the row of completion {index} {found} {field!r}, which holds the answer this reward "
                        "compares with (a string or number; the reward's 'field' option names another field)")
    return str(value)


def _answer_reward(same: Callable[[str, str], bool], field: str) -> RewardFn:
    """1.0 where `same(completion, answer)`, else 0.0."""
    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [float(same(text, answer_of(row, field, i))) for i, (text, row) in enumerate(zip(completions, rows))]
    return reward


def make_exact_match(field: str = "answer", normalize: bool = True) -> RewardFn:
    """exact_match: 1.0 where the completion equals the row's answer (both normalised unless normalize=False)."""
    return _answer_reward(exact_match if normalize else str.__eq__, field)


def make_contains(field: str = "answer", normalize: bool = True) -> RewardFn:
    """contains: 1.0 where the row's answer occurs in the completion (both normalised unless normalize=False)."""
    return _answer_reward(contains if normalize else (lambda text, answer: answer in text), field)


def make_regex(pattern: str) -> RewardFn:
    """regex: 1.0 where re.search(pattern, completion) matches."""
    compiled = re.compile(pattern)  # a bad pattern raises re.error: load_rewards names the entry

    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [float(compiled.search(text) is not None) for text in completions]
    return reward


def overlong_penalty(length: int, target_length: int, max_length: int) -> float:
    """0 up to target_length, then linearly down to -1 at max_length, -1 beyond (DAPO eq. 13)."""
    if length <= target_length:
        return 0.0
    if length > max_length:
        return -1.0
    return (target_length - length) / (max_length - target_length)


def make_length_penalty(target_length: int, max_length: int | None = None) -> RewardFn:
    """length_penalty: `overlong_penalty` of each completion's length in characters."""
    top = target_length if max_length is None else max_length
    if top < target_length:
        raise ValueError(f"max_length {top} is below target_length {target_length}")

    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [overlong_penalty(len(text), target_length, top) for text in completions]
    return reward


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: its factory and the types of the options it takes (required ones listed apart)."""

    make: Callable[..., RewardFn]
    options: dict[str, type | tuple[type, ...]]
    required: tuple[str, ...] = ()


BUILTINS = {
    "exact_match": Builtin(make_exact_match, {"field": str, "normalize": bool}),
    "contains": Builtin(make_contains, {"field": str, "normalize": bool}),
    "regex": Builtin(make_regex, {"pattern": str}, required=("pattern",)),
    "length_penalty": Builtin(make_length_penalty, {"target_length": int, "max_length": int},
                              required=("target_length",)),
}


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """The current directory on sys.path while importing a user's module (the CLI's sys.path[0] is its script's)."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def import_reward(spec: str, where: str) -> Reward:
    """The user callable `spec` ("module:function", the function may be dotted: "module:Class.method")."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where}: {spec!r} is not 'module:function'")
    try:
        with _current_directory_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(f"{error.name}.")):
            raise ConfigError(f"{where}: reward {spec!r}: no module named {module_name!r} (looked in the current "
                              "directory and on sys.path)") from None
        raise ConfigError(f"{where}: reward {spec!r}: module {module_name!r} fails to import: "
                          f"{type(error).__name__}: {error}") from error
    except Exception as error:  # the user's module raised while importing: say so in one line
        raise ConfigError(f"{where}: reward {spec!r}: module {module_name!r} fails to import: "
                          f"{type(error).__name__}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: reward {spec!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: reward {spec!r}: {attribute!r} is not callable: {_short(target)}")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # callables without a signature (some C functions) go unchecked
        return Reward(spec, target)
    try:
        signature.bind([], [], [])
    except TypeError:
        raise ConfigError(f"{where}: reward {spec!r} takes {signature}, but a reward is called as "
                          f"{attribute}(prompts, completions, rows)") from None
    return Reward(spec, target)


def _builtin(name: str, options: dict[str, Any], where: str) -> Reward:
    builtin = BUILTINS[name]
    for key, value in options.items():
        if key not in builtin.options:
            keys = ", ".join(["name", "weight", *builtin.options])
            raise ConfigError(f"{where}: reward {name!r} has no option {key!r}; its keys: {keys}")
        wanted = builtin.options[key]
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: reward {name!r} option {key!r} must be of type {wanted.__name__}, "
                              f"not {value!r}")
        if wanted is int and value < 0:
            raise ConfigError(f"{where}: reward {name!r} option {key!r} must be >= 0, not {value}")
    missing = [key for key in builtin.required if key not in options]
    if missing:
        raise ConfigError(f"{where}: reward {name!r} needs {' and '.join(map(repr, missing))} "
                          f"(write it as {{name: {name}, {missing[0]}: ...}})")
    try:
        return Reward(name, builtin.make(**options))
    except re.error as error:
        raise ConfigError(f"{where}: reward 'regex': pattern {options['pattern']!r} does not compile: "
                          f"{error}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: reward {name!r}: {error}") from None


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where}: weight must be a finite number, not {value!r}")
    return float(value)


def load_reward(spec: Any, where: str) -> tuple[str, float, Reward]:
    """(name, weight, reward) of one `train.rewards` entry (see the module docstring)."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        weight = _weight(options.pop("weight", 1.0), where)
        if not isinstance(name, str):
            raise ConfigError(f"{where}: a reward mapping needs 'name' (a built-in or 'module:function'), "
                              f"got {spec!r}")
    elif isinstance(spec, str):
        name, weight, options = spec, 1.0, {}
    else:
        raise ConfigError(f"{where}: a reward is a name, 'module:function' or a mapping with 'name', "
                          f"not {spec!r}")
    if name in BUILTINS:
        return name, weight, _builtin(name, options, where)
    if ":" not in name:
        raise ConfigError(f"{where}: unknown reward {name!r}; built-ins: {', '.join(sorted(BUILTINS))}, or "
                          "'module:function' for your own")
    if options:
        raise ConfigError(f"{where}: reward {name!r} takes no options (only 'name' and 'weight'), "
                          f"got {', '.join(map(repr, options))}")
    return name, weight, import_reward(name, where)


def load_rewards(specs: Sequence | str | Mapping, where: str = "train.rewards") -> list[tuple[str, float, Reward]]:
    """(name, weight, reward) for each entry of `specs`; names are unique (a second "regex" becomes "regex_2")."""
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    if not specs:
        raise ConfigError(f"{where} is empty: name at least one reward (built-ins: {', '.join(sorted(BUILTINS))}, "
                          "or 'module:function')")
    loaded: list[tuple[str, float, Reward]] = []
    for index, spec in enumerate(specs):
        name, weight, reward = load_reward(spec, f"{where}[{index}]")
        taken = {entry[0] for entry in loaded}
        unique, copy = name, 1
        while unique in taken:
            copy += 1
            unique = f"{name}_{copy}"
        loaded.append((unique, weight, reward))
    return loaded


# ----------------------------------------------------------------------------- scoring


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _failing_completion(reward: Reward, prompts: list[str], completions: list[str], rows: list[dict]) -> int | None:
    """The first completion on which `reward`, called on that completion alone, raises (None if none does)."""
    for index in range(len(completions)):
        try:
            reward(prompts[index:index + 1], completions[index:index + 1], rows[index:index + 1])
        except Exception:  # the caller reports the batch's error; this only finds where it happens
            return index
    return None


def call_reward(reward: Reward, prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """`reward`'s values as floats, or a LorakitError naming the reward and the completion at fault.

    When the reward raises on the batch, it is called again on one completion at a time to find the first
    that fails, so the error can name it."""
    count = len(completions)
    try:
        values = reward(prompts, completions, rows)
    except LorakitError as error:  # a built-in's own message already names the completion
        raise LorakitError(f"reward {reward.name}: {error}") from None
    except Exception as error:
        index = _failing_completion(reward, prompts, completions, rows)
        place = (f"on completion {index}" if index is not None
                 else f"on a batch of {count} completions (each alone scores without error)")
        raise LorakitError(f"reward {reward.name} raised {type(error).__name__} {place}: {error}") from error
    if isinstance(values, torch.Tensor):
        values = values.tolist() if values.dim() == 1 else values
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise LorakitError(f"reward {reward.name} returned {_short(values)}: a reward returns a list of "
                           f"{count} numbers, one per completion")
    if len(values) != count:
        raise LorakitError(f"reward {reward.name} returned {len(values)} values for {count} completions: a reward "
                           "returns one number per completion")
    numbers_out = []
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise LorakitError(f"reward {reward.name} returned {_short(value)} for completion {index}: rewards "
                               "must be numbers")
        if not math.isfinite(value):
            raise LorakitError(f"reward {reward.name} returned {value} for completion {index}: rewards must be "
                               "finite numbers")
        numbers_out.append(float(value))
    return numbers_out


def score(rewards: Sequence[tuple[str, float, Reward]], prompts: list[str], completions: list[str],
          rows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total (N,) float32, {name: (N,) float32}): each completion's weighted sum of rewards, and each reward's
    own values, for N completions with their prompts and dataset rows."""
    if not len(prompts) == len(completions) == len(rows):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(rows)} rows")
    total = torch.zeros(len(completions), dtype=torch.float64)
    each: dict[str, torch.Tensor] = {}
    for name, weight, reward in rewards:
        values = torch.tensor(call_reward(reward, prompts, completions, rows), dtype=torch.float64)
        each[name] = values.float()
        total += weight * values
    return total.float(), each
