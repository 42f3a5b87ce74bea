"""The method registry and the one contract every method implements.

A method has two parts:

- its **config**: a dataclass in `adapters/config.py` (torch-free, so the CLI can list and check
  every field without importing torch), with a `name` ClassVar, decorated with `register_method`;
  it names its implementation module in the `implementation` ClassVar;
- its **implementation**: one module (`adapters/lora.py`, `adapters/dora.py`, ...) holding the
  method's whole story (math, layer, save/load, merge, count) and defining the functions of
  `CONTRACT` at module level:

      apply(cfg, model) -> model                  inject the method into `model` in place
      save(cfg, model, folder, base=None, *, tokenizer=None, state_dict=None) -> Path
      load_folder(base_model, folder, raw) -> model          a saved folder onto a base model
      named(model, name, folder, raw) -> NamedLoRA | NamedDeltas | NamedPrompt   add-as-named
      merge(cfg, model, **options) -> model       fold the update into the base weights
      unload(cfg, model) -> model                 remove the method: the base as before `apply`
      count(cfg, model) -> {group: trainable}     trainable numbers per module group; works on a
                                                  skeleton on the meta device (shapes only)

A method that cannot do one of these (prompt tuning cannot merge) still defines the function
and raises an AdapterError saying why. `implementation(cfg)` imports the module on first use.
"""
from __future__ import annotations

import importlib
from types import ModuleType

CONTRACT = ("apply", "save", "load_folder", "named", "merge", "unload", "count")
METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: register a method config class under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a `name` ClassVar to be registered as a method")
    if not isinstance(getattr(cls, "implementation", None), str):
        raise TypeError(f"{cls.__name__} needs an `implementation` ClassVar naming its module")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is already taken by {METHODS[name].__name__}")
    METHODS[name] = cls
    return cls


def implementation(cfg: object) -> ModuleType:
    """The module that implements the method of config `cfg` (an instance or a class)."""
    cls = cfg if isinstance(cfg, type) else type(cfg)
    return importlib.import_module(cls.implementation)


def method_for_folder(folder_type: object) -> type | None:
    """The method whose folders carry `folder_type` (lorakit's `lorakit_method` or peft's `peft_type`
    in adapter_config.json, declared by the config class itself as `folder_type`); None for unknowns."""
    if not isinstance(folder_type, str):
        return None
    return next((cls for cls in METHODS.values() if vars(cls).get("folder_type") == folder_type), None)


def own_folder_types() -> list[str]:
    """The `lorakit_method` values of lorakit's own folder formats."""
    return sorted(t for t in (vars(cls).get("folder_type") for cls in METHODS.values())
                  if isinstance(t, str) and t.islower())
