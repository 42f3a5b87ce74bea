"""Reading an adapter folder's JSON config, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import AdapterError


def read_json_object(path: Path, missing: str) -> dict:
    """The JSON object in `path`; an AdapterError when the file is absent (`missing` says what
    the folder should hold), is not valid JSON, or holds something other than an object."""
    if not path.is_file():
        raise AdapterError(f"{path} not found; {missing}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw
