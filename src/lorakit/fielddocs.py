"""Help text and defaults of config fields, as declared with `lorakit.schema.setting`.

`field_docs(cls)` is each field's `setting(..., doc=...)` (its `metadata["help"]`); the CLI's
`--help` is built from it, with `field_default` for the "(default: ...)" part.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lorakit.schema import HELP


def field_docs(cls: type) -> dict[str, str]:
    """{field name: help text} of each init field of dataclass `cls`, in declaration order."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    return {f.name: str(f.metadata.get(HELP) or "") for f in fields}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (or dataclasses.MISSING)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING
