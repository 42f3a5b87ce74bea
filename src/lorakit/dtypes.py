"""One spelling of the floating-point dtypes in every option: fp32, bf16, fp16.

model.dtype, --dtype, train.precision's modes, the QLoRA compute dtype and the memory calculator
all read a dtype name through `canonical` (or `spelled`, for a config field that checks its own
choices), so the usual other spellings are accepted as aliases (float32, f32; bfloat16; float16,
half, f16) and shown as the canonical name. torch is imported on first use of `to_torch`: config
classes read the table without paying for it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    import torch

CANONICAL = ("fp32", "bf16", "fp16")  # the spelling docs, errors and saved configs use
ALIASES = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "f16": "fp16"}
SPELLINGS = {**{name: name for name in CANONICAL}, **ALIASES}  # every accepted spelling -> its canonical name
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # canonical -> the torch attribute
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element


def accepted() -> str:
    """The accepted spellings, for help texts and errors: 'fp32, bf16 or fp16 (also float32, f32, ...)'."""
    return f"{', '.join(CANONICAL[:-1])} or {CANONICAL[-1]} (also accepted: {', '.join(ALIASES)})"


def spelled(value: Any) -> Any:
    """The canonical name of a dtype spelling (any case); any other value unchanged (the caller's check refuses
    it, listing its choices)."""
    if isinstance(value, str):
        return SPELLINGS.get(value.strip().lower(), value)
    return value


def canonical(name: str, what: str | None = None) -> str:
    """The canonical name of dtype spelling `name`, or a ConfigError naming `what` (the option, e.g. '--dtype')
    and the accepted spellings."""
    found = spelled(name)
    if found not in CANONICAL:
        raise ConfigError(f"{what + ': ' if what else ''}unknown dtype {name!r}; use {accepted()}")
    return found


def to_torch(name: str, what: str | None = None) -> torch.dtype:
    """The torch dtype of dtype spelling `name` (checked as `canonical` does)."""
    import torch  # on use only: this module sits below the torch-free config classes

    return getattr(torch, TORCH_NAMES[canonical(name, what)])


def from_torch(dtype: torch.dtype) -> str | None:
    """The canonical name of a torch dtype, or None for one outside the table (e.g. float64)."""
    text = str(dtype).removeprefix("torch.")
    return next((name for name, attribute in TORCH_NAMES.items() if attribute == text), None)
