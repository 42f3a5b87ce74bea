"""The method registry: method name -> config dataclass.

A method is one file whose config dataclass has a `name` ClassVar and an `apply(model)` method,
decorated with `@register_method`; `lorakit.adapters` imports the file. A method with a folder
format of its own also declares `folder_type` and a `load_folder(base_model, folder, raw)`. config.py builds a
method from YAML by looking its name up here, and `lorakit.apply` calls the config's `apply`.
"""
from __future__ import annotations

METHODS: dict[str, type] = {}


def method_for_folder(folder_type: object) -> type | None:
    """The method whose folders carry `folder_type` (lorakit's `lorakit_method` or peft's `peft_type`
    in adapter_config.json, declared by the class as `folder_type`); None for PEFT LoRA and unknowns."""
    if not isinstance(folder_type, str):
        return None
    return next((cls for cls in METHODS.values() if getattr(cls, "folder_type", None) == folder_type), None)


def own_folder_types() -> list[str]:
    """The `lorakit_method` values of lorakit's own folder formats."""
    return sorted(cls.folder_type for cls in METHODS.values()
                  if isinstance(getattr(cls, "folder_type", None), str) and cls.folder_type.islower())


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
