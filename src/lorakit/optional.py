"""Optional dependencies: the one rule for importing a package that only an extra installs.

    uvicorn = require("uvicorn", "serve", "lorakit serve")

returns the module, or raises `MissingDependency` with one line that names the extra to install
(the CLI prints it as `error: ...` and exits 2, never a traceback). The extras are declared in
pyproject.toml: `serve` (fastapi, uvicorn), `quant` (bitsandbytes), and one per experiment tracker of
train.report_to (`tensorboard`, `mlflow`, `wandb`, `trackio`; `trackers` installs all four).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from lorakit.errors import LorakitError


class MissingDependency(LorakitError, ImportError):
    """An optional package a feature needs is not installed (or cannot be imported)."""


def install_hint(extra: str) -> str:
    """How to install `extra`, from PyPI and from a source checkout."""
    return f"pip install 'lorakit[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`import module`, or a MissingDependency naming the `extra` that installs it for `feature`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name is not None and (exc.name == module or module.startswith(f"{exc.name}."))
        if missing:
            raise MissingDependency(f"{feature} needs {module}, which is not installed; install the "
                                    f"'{extra}' extra: {install_hint(extra)}") from None
        # the package is there but one of its own imports fails: a broken install
        raise MissingDependency(f"{feature} needs {module}, which is installed but fails to import ({exc}); "
                                f"reinstall the '{extra}' extra: {install_hint(extra)}") from exc
