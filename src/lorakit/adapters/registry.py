"""The method registry: method name -> config dataclass.

A method is one file whose config dataclass has a `name` ClassVar and an `apply(model)` method,
decorated with `@register_method`; `lorakit.adapters` imports the file. config.py builds a
method from YAML by looking its name up here, and `lorakit.apply` calls the config's `apply`.
"""
from __future__ import annotations

METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: register a method config class under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a `name` ClassVar to be registered as a method")
    if not callable(getattr(cls, "apply", None)):
        raise TypeError(f"{cls.__name__} needs an apply(model) method to be registered as a method")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is already taken by {METHODS[name].__name__}")
    METHODS[name] = cls
    return cls
