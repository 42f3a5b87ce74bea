"""Many LoRA adapters on one base model, chosen by name, per whole batch or per row.

    add_adapter(model, "sql", "out/sql-adapter")      # a PEFT LoRA folder
    add_adapter(model, "chat", "out/chat-adapter")
    set_adapter(model, "sql")                         # every row uses "sql" (None: the base)
    with adapter_rows(model, ["sql", None, "chat"]):  # row 0 sql, row 1 base, row 2 chat
        logits = model(input_ids).logits

Nothing is merged and the base weights are never touched: each adapted module gets a forward
hook that adds s * B (A x) for the rows of each adapter in use (gather the rows, two small
matmuls, index_add back). A batch that mixes adapters costs one base forward plus one low-rank
branch per adapter present. The single-adapter path (`apply` / `load_adapter`, LoRALayer) is a
different mechanism and stays as it was; a model carries one or the other.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.layers import adapter_dtype
from lorakit.adapters.lora_math import lora_branch, scaling
from lorakit.adapters.named import read_named
from lorakit.adapters.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.adapters.peft_load import read_config, read_weights, validate
from lorakit.adapters.state import get_state, lora_layers
from lorakit.errors import AdapterError

BANK_ATTR = "lorakit_named_adapters"
Plan = list[tuple[str, torch.Tensor | None]]  # (adapter name, row indices or None for all rows)


@dataclass
class NamedLoRA:
    """One named adapter: module path -> (A (r, d_in), B (d_out, r)) and its scaling."""

    name: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    source: str = ""

    @property
    def paths(self) -> list[str]:
        """The module paths this adapter hooks."""
        return list(self.pairs)

    def delta(self, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """s * B (A x) for module `path`, in the dtype of its output `y`."""
        A, B = self.pairs[path]
        return lora_branch(x.to(A.dtype), A, B, self.scale).to(y.dtype)


@dataclass
class AdapterBank:
    """The named adapters on a model, the hooks that apply them, and what the next forward uses."""

    adapters: dict[str, NamedLoRA] = field(default_factory=dict)  # or named.NamedDeltas (bottleneck, MoLE)
    hooks: dict[str, object] = field(default_factory=dict)  # module path -> hook handle
    plan: Plan = field(default_factory=list)

    def branch(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus what every planned adapter adds to module `path`'s output (for its rows).

        A sub-block may return a tuple (hidden states first, as attention blocks do); then only the
        hidden states change. `x` is the module's positional input (None when called by keyword).
        """
        hidden = out[0] if isinstance(out, tuple) else out
        for name, rows in self.plan:
            adapter = self.adapters[name]
            if path not in adapter.paths:
                continue
            if rows is None:
                hidden = hidden + adapter.delta(path, x, hidden)  # (B, T, d_out)
            else:
                part = adapter.delta(path, None if x is None else x[rows], hidden[rows])  # (b, T, d_out)
                hidden = hidden.index_add(0, rows, part)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters added with `add_adapter`, in the order they were added."""
    bank = getattr(model, BANK_ATTR, None)
    return list(bank.adapters) if bank is not None else []


def _bank(model: nn.Module) -> AdapterBank:
    bank = getattr(model, BANK_ATTR, None)
    if bank is None:
        if get_state(model) is not None or lora_layers(model):
            raise AdapterError(f"{type(model).__name__} already carries an adapter applied with apply/load_adapter; "
                               "named adapters go on a plain base model (unload it, or add it by name instead)")
        bank = AdapterBank()
        setattr(model, BANK_ATTR, bank)
    return bank


def _read_folder(model: nn.Module, name: str, folder: Path) -> NamedLoRA:
    raw = read_config(folder / CONFIG_NAME)
    weights = read_weights(folder / WEIGHTS_NAME, prefix=PREFIX)
    validate(model, weights, raw, [], source=folder / WEIGHTS_NAME)
    if weights.params:
        raise AdapterError(f"{folder}: adapter {name!r} also trains {sorted(weights.params)[0]!r} (a bias or a "
                           "modules_to_save copy); per-row adapters hold LoRA weights only, so load it with "
                           "load_adapter instead")
    base_weight = next(model.parameters())
    dtype = adapter_dtype(base_weight.dtype)
    pairs = {path: (A.to(base_weight.device, dtype), B.to(base_weight.device, dtype))
             for path, (A, B) in weights.lora.items()}
    return NamedLoRA(name, pairs, scaling(raw.get("lora_alpha", 8), raw["r"], bool(raw.get("use_rslora"))),
                     str(folder))


def _hook(bank: AdapterBank, path: str):
    def add_branches(module, args, output):
        return bank.branch(path, args[0] if args else None, output) if bank.plan else output
    return add_branches


def add_adapter(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    """Load the adapter folder `path` (PEFT LoRA, or lorakit's bottleneck / MoLE) onto `model` under `name`
    (not active until chosen)."""
    if not name or name in ("base", "none"):
        raise AdapterError(f"adapter name {name!r} is reserved or empty; pick another name")
    bank = _bank(model)
    if name in bank.adapters:
        raise AdapterError(f"an adapter named {name!r} is already loaded (from {bank.adapters[name].source}); "
                           "delete_adapter it first or pick another name")
    adapter = read_named(model, name, Path(path)) or _read_folder(model, name, Path(path))
    bank.adapters[name] = adapter
    for module_path in adapter.paths:
        if module_path not in bank.hooks:
            module = model.get_submodule(module_path)
            bank.hooks[module_path] = module.register_forward_hook(_hook(bank, module_path))
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`; its hooks go when no other adapter uses the module."""
    bank = getattr(model, BANK_ATTR, None)
    _require(bank, name)
    del bank.adapters[name]
    bank.plan = [(n, rows) for n, rows in bank.plan if n != name]
    used = {p for adapter in bank.adapters.values() for p in adapter.paths}
    for module_path in [p for p in bank.hooks if p not in used]:
        bank.hooks.pop(module_path).remove()
    return model


def _require(bank: AdapterBank | None, name: str | None) -> None:
    if name is None:
        return
    known = list(bank.adapters) if bank is not None else []
    if name not in known:
        raise AdapterError(f"no adapter named {name!r} is loaded; loaded adapters: {', '.join(known) or 'none'}")


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make every row of later forwards use adapter `name` (None: the plain base model)."""
    bank = getattr(model, BANK_ATTR, None)
    _require(bank, name)
    if bank is not None:
        bank.plan = [] if name is None else [(name, None)]
    return model


def row_plan(names: Sequence[str | None], device: torch.device | str = "cpu") -> Plan:
    """Group row numbers by adapter: ["a", None, "a"] -> [("a", tensor([0, 2]))]; None rows get none."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(row)
    if len(groups) == 1 and len(next(iter(groups.values()))) == len(names):
        return [(next(iter(groups)), None)]
    return [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]


@contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row i of every forward uses adapter names[i] (None: the base)."""
    bank = getattr(model, BANK_ATTR, None)
    for name in set(names):
        _require(bank, name)
    if bank is None:  # base rows only, no adapters loaded: nothing to route
        yield model
        return
    previous = bank.plan
    bank.plan = row_plan(names, next(model.parameters()).device)
    try:
        yield model
    finally:
        bank.plan = previous
