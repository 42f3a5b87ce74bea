"""Help text of dataclass fields, wherever the author wrote it.

`field_docs(cls)` takes, per field: `field(metadata={"help": ...})`; else an attribute docstring
(a string literal right under the field, as LitGPT writes them); else a `#` comment on the
field's line or on the lines just above it (nanoGPT style). The CLI's `--help` is built from it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any


def _comment(line: str) -> str:
    """The text of a trailing `# comment` on a source line ('' when none)."""
    import io
    import tokenize

    try:
        for token in tokenize.generate_tokens(io.StringIO(line).readline):
            if token.type == tokenize.COMMENT:
                return token.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return ""


def _source_docs(cls: type) -> dict[str, str]:
    """Docs written in the class source: attribute docstrings, trailing or preceding comments."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for index, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        following = body[index + 1] if index + 1 < len(body) else None
        if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant) \
                and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
            continue
        text = _comment(lines[node.end_lineno - 1])
        row = node.lineno - 2
        above: list[str] = []
        while not text and row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        docs[node.target.id] = text or " ".join(above)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Help text of each field of dataclass `cls` (metadata 'help' wins over source docs)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # inherited fields keep their parent's docs
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _source_docs(klass).items() if v})
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = str(f.metadata["help"])
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls) if f.init}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (or dataclasses.MISSING)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING
