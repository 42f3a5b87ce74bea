"""Lazy re-exports for package __init__ files.

`import lorakit` (and `lorakit.data`, `lorakit.train`) stays cheap: a name is imported from its
defining module on first use, so `lorakit --help` or reading a config dataclass does not pay for
torch and transformers. The other deferred imports are the commands' own (see `lorakit.commands`).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, resolving each name in `exports` (name -> module)
    on first access and caching it in the package's `namespace`."""
    public = sorted(exports)

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return public

    return getattr_, dir_
