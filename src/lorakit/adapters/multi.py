"""Many LoRA adapters on one base model, chosen by name, per whole batch or per row.

    add_adapter(model, "sql", "out/sql-adapter")      # a PEFT LoRA folder
    add_adapter(model, "chat", "out/chat-adapter")
    set_adapter(model, "sql")                         # every row uses "sql" (None: the base)
    with adapter_rows(model, ["sql", None, "chat"]):  # row 0 sql, row 1 base, row 2 chat
        logits = model(input_ids).logits

Nothing is merged and the base weights are never touched: each adapted module gets a forward
hook that adds s * B (A x) with each row's own adapter. Rows keep their adapter for the whole
`adapter_rows` block (a decoding loop), so each module stacks its per-row A and s*B once (zeros
for rows without an adapter there) and then costs two batched matmuls per step, however many
adapters the batch mixes. Whole-batch choices (`set_adapter`) use the plain two-matmul branch.
The single-adapter path (`apply` / `load_adapter`, LoRALayer) is a different mechanism and stays
as it was; a model carries one or the other.

Bottleneck, MoLE and prompt-tuning folders are named adapters too (adapters/named.py). A prompt
adapter's virtual tokens go in front of its rows; rows of the same batch without it (or with a
shorter prompt) get that front masked out, so each row still computes what it would alone.

DoRA adapters (use_dora: true) work too: at inference W, A, B and m are fixed, so each module's
factor g = m / ||W + s B A|| is computed once at load, and a DoRA row's output becomes
g * (W x + s B A x) + b, i.e. g * (LoRA output) + (1 - g) * b, one more multiply-add per row.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.dispatch import read_named
from lorakit.adapters.dora import rescale
from lorakit.adapters.lora_math import lora_branch
from lorakit.adapters.named import NamedLoRA, NamedPrompt
from lorakit.adapters.prompt_tuning import attach_prompt_hooks
from lorakit.adapters.state import get_state, lora_layers
from lorakit.errors import AdapterError

BANK_ATTR = "lorakit_named_adapters"
Plan = list[tuple[str, torch.Tensor | None]]  # (adapter name, row indices or None for all rows)


@dataclass
class AdapterBank:
    """The named adapters on a model, the hooks that apply them, and what the next forward uses."""

    adapters: dict[str, NamedLoRA] = field(default_factory=dict)
    hooks: dict[str, object] = field(default_factory=dict)  # module path -> hook handle
    plan: Plan = field(default_factory=list)
    rows: list[str | None] | None = None
    """Per-row adapter names while `adapter_rows` is active (None: `plan` applies to whole batches)."""
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    """Module path -> per-row (A^T (N, d_in, r), (s*B)^T (N, r, d_out)) for `rows`, built on first use."""
    prompt_hooks: list = field(default_factory=list)
    """Handles of the model-level hooks that put prompt adapters' virtual tokens in front (while any is loaded)."""
    checked: tuple[object, Plan, bool, list] = (None, [], True, [])
    """Worked out once per plan, not per call: (the plan list last checked, its part for adapters that hook
    modules, whether that part holds only LoRA/DoRA adapters, its prompt adapters as (embeddings, rows))."""

    def _check(self) -> tuple[object, Plan, bool, list]:
        if self.checked[0] is not self.plan:
            hooked = [(n, rows) for n, rows in self.plan if not isinstance(self.adapters[n], NamedPrompt)]
            prompts = [(self.adapters[n].embeddings, None if rows is None else rows.tolist())
                       for n, rows in self.plan if isinstance(self.adapters[n], NamedPrompt)]
            self.checked = (self.plan, hooked, all(isinstance(self.adapters[n], NamedLoRA) for n, _ in hooked), prompts)
        return self.checked

    def lora_only(self) -> bool:
        """True when every module-hooking adapter in the plan is a NamedLoRA (the stacked fast path applies)."""
        return self._check()[2]

    def row_prompts(self, batch: int) -> list[torch.Tensor | None]:
        """Each row's virtual tokens (n, d) from the prompt adapter the plan gives it (None: no prompt)."""
        prompts: list[torch.Tensor | None] = [None] * batch
        for embeddings, rows in self._check()[3]:
            for row in range(batch) if rows is None else rows:
                prompts[row] = embeddings
        return prompts

    def branch(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus the low-rank branch of each row's adapter for module `path`."""
        if not self.lora_only():
            return self._mixed_branch(path, x, out)
        if self.rows is not None and x is not None and x.dim() == 3 and x.shape[0] == len(self.rows):
            return self._batched_branch(path, x, out)
        for name, rows in self._check()[1]:
            pair = self.adapters[name].pairs.get(path)
            if pair is None:
                continue
            A, B = pair
            adapter = self.adapters[name]
            if rows is None:
                out = rescale(out + lora_branch(x.to(A.dtype), A, B, adapter.scale).to(out.dtype),
                               adapter.dora.get(path))  # (B, T, d_out)
            else:
                part = lora_branch(x[rows].to(A.dtype), A, B, adapter.scale).to(out.dtype)  # (b, T, d_out)
                out = out.index_copy(0, rows, rescale(out[rows] + part, adapter.dora.get(path)))
        return out

    def _mixed_branch(self, path: str, x: torch.Tensor | None, out):
        """Plans holding a bottleneck or MoLE adapter (adapters/named.py): each adapter in turn on its rows.
        A sub-block's tuple output changes only in its hidden states (its first element)."""
        hidden = out[0] if isinstance(out, tuple) else out
        for name, rows in self._check()[1]:
            adapter = self.adapters[name]
            if path not in adapter.paths:
                continue
            x_rows = x if rows is None or x is None else x[rows]
            y_rows = hidden if rows is None else hidden[rows]  # (b, T, d_out)
            new = y_rows + adapter.delta(path, x_rows, y_rows)
            if isinstance(adapter, NamedLoRA):
                new = rescale(new, adapter.dora.get(path))
            hidden = new if rows is None else hidden.index_copy(0, rows, new)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _batched_branch(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Every row at once: two batched matmuls with each row's own (zero-padded) A and B."""
        if path not in self.stacked:
            self.stacked[path] = self._stack(path)
        weights = self.stacked[path]
        if weights is None:
            return out
        A_t, B_t, dora = weights  # (N, d_in, r), (N, r, d_out), per-row DoRA (g, c) (N, 1, d_out) or None
        low = torch.bmm(x if x.dtype == A_t.dtype else x.to(A_t.dtype), A_t)  # (N, T, d_in) -> (N, T, r)
        if out.dtype == B_t.dtype:
            out = torch.baddbmm(out, low, B_t)  # out + low @ B_t: (N, T, d_out)
        else:
            out = out + torch.bmm(low, B_t).to(out.dtype)
        return out if dora is None else rescale(out, dora)

    def _stack(self, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row A and s*B for module `path`; rows without an adapter there get zeros (rank padded)."""
        pairs = {n: self.adapters[n].pairs[path] for n in set(self.rows)
                 if n and isinstance(self.adapters[n], NamedLoRA) and path in self.adapters[n].pairs}
        if not pairs:
            return None
        r = max(A.shape[0] for A, _ in pairs.values())
        names = list(pairs)
        A0, B0 = pairs[names[0]]
        # slot 0: zeros (rows without an adapter here); slot i + 1: adapter names[i], rank padded with zeros
        A_slots = A0.new_zeros(len(names) + 1, r, A0.shape[1])  # (K + 1, r, d_in)
        B_slots = B0.new_zeros(len(names) + 1, B0.shape[0], r)  # (K + 1, d_out, r)
        for slot, name in enumerate(names, 1):
            A, B = pairs[name]
            A_slots[slot, :A.shape[0]] = A
            B_slots[slot, :, :B.shape[1]] = B * self.adapters[name].scale
        index = torch.tensor([names.index(n) + 1 if n in pairs else 0 for n in self.rows], device=A0.device)
        # per row, transposed for bmm: (N, d_in, r) and (N, r, d_out)
        A_t, B_t = A_slots[index].transpose(1, 2).contiguous(), B_slots[index].transpose(1, 2).contiguous()
        return A_t, B_t, self._stack_dora(path, names, index, B0.shape[0], B0)

    def _stack_dora(self, path: str, names: list[str], index: torch.Tensor, d_out: int, like: torch.Tensor):
        """Per-row DoRA factors (g, c), each (N, 1, d_out); g = 1, c = 0 for LoRA rows; None without DoRA."""
        if not any(path in self.adapters[n].dora for n in names):
            return None
        g_slots, c_slots = like.new_ones(len(names) + 1, d_out), like.new_zeros(len(names) + 1, d_out)
        for slot, name in enumerate(names, 1):
            if path in self.adapters[name].dora:
                g_slots[slot], c_slots[slot] = self.adapters[name].dora[path]
        return g_slots[index].unsqueeze(1), c_slots[index].unsqueeze(1)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters added with `add_adapter`, in the order they were added."""
    bank = getattr(model, BANK_ATTR, None)
    return list(bank.adapters) if bank is not None else []


def _bank(model: nn.Module) -> AdapterBank:
    bank = getattr(model, BANK_ATTR, None)
    if bank is None:
        state = get_state(model)
        routed = state is not None and getattr(state.method, "routed", False)  # text rows see the base: composable
        if (state is not None and not routed) or lora_layers(model):
            raise AdapterError(f"{type(model).__name__} already carries an adapter applied with apply/load_adapter; "
                               "named adapters go on a plain base model (unload it, or add it by name instead)")
        bank = AdapterBank()
        setattr(model, BANK_ATTR, bank)
    return bank


def _hook(bank: AdapterBank, path: str):
    def add_branches(module, args, output):
        return bank.branch(path, args[0] if args else None, output) if bank.plan else output
    return add_branches


def add_adapter(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    """Load the adapter folder `path` (PEFT LoRA / DoRA / prompt tuning, or lorakit's bottleneck / MoLE) onto
    `model` under `name` (not active until chosen)."""
    if not name or name in ("base", "none"):
        raise AdapterError(f"adapter name {name!r} is reserved or empty; pick another name")
    bank = _bank(model)
    if name in bank.adapters:
        raise AdapterError(f"an adapter named {name!r} is already loaded (from {bank.adapters[name].source}); "
                           "delete_adapter it first or pick another name")
    adapter = read_named(model, name, Path(path))
    bank.adapters[name] = adapter
    if isinstance(adapter, NamedPrompt) and not bank.prompt_hooks:
        bank.prompt_hooks = attach_prompt_hooks(model, bank.row_prompts)
    for module_path in adapter.paths:
        if module_path not in bank.hooks:
            module = model.get_submodule(module_path)
            bank.hooks[module_path] = module.register_forward_hook(_hook(bank, module_path))
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`; its hooks go when no other adapter uses the module (the prompt hooks: no other
    prompt adapter)."""
    bank = getattr(model, BANK_ATTR, None)
    _require(bank, name)
    del bank.adapters[name]
    bank.stacked = {}
    bank.plan = [(n, rows) for n, rows in bank.plan if n != name]
    used = {p for adapter in bank.adapters.values() for p in adapter.paths}
    for module_path in [p for p in bank.hooks if p not in used]:
        bank.hooks.pop(module_path).remove()
    if not any(isinstance(adapter, NamedPrompt) for adapter in bank.adapters.values()):
        for handle in bank.prompt_hooks:
            handle.remove()
        bank.prompt_hooks = []
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


def keep_rows(model: nn.Module, kept: Sequence[int]) -> None:
    """Inside `adapter_rows`: the batch shrank to rows `kept` (positions in the current batch)."""
    bank = getattr(model, BANK_ATTR, None)
    if bank is None or bank.rows is None:
        return
    index = torch.tensor(list(kept), device=next(model.parameters()).device)
    bank.rows = [bank.rows[i] for i in kept]
    bank.plan = row_plan(bank.rows, index.device)
    bank.stacked = {path: None if w is None else _select_rows(w, index) for path, w in bank.stacked.items()}


def _select_rows(weights, index: torch.Tensor):
    A_t, B_t, dora = weights
    return A_t[index], B_t[index], None if dora is None else (dora[0][index], dora[1][index])


@contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row i of every forward uses adapter names[i] (None: the base)."""
    bank = getattr(model, BANK_ATTR, None)
    for name in set(names):
        _require(bank, name)
    if bank is None:  # base rows only, no adapters loaded: nothing to route
        yield model
        return
    previous = bank.plan, bank.rows, bank.stacked
    bank.plan, bank.rows, bank.stacked = row_plan(names, next(model.parameters()).device), list(names), {}
    try:
        yield model
    finally:
        bank.plan, bank.rows, bank.stacked = previous
