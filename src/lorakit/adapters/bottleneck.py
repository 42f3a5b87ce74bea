"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751).

After the attention and/or MLP sub-block of every decoder layer, the sub-block's output y goes
through a small residual bottleneck:

    y' = y + W_up f(W_down y),     W_down (size x d), W_up (d x size), W_up = 0 at init,

so the adapted model starts exactly equal to the base. The adapter is a child module
`lorakit_bottleneck` of the sub-block, applied by a forward hook on it: the base modules keep
their names and classes, so the same code serves Llama-, GPT-2- and BLOOM-style layers.
(BLOOM adds the residual inside its sub-blocks, so there the adapter sees x + sublayer(x).)

Saved in lorakit's own folder format (see `own_format`): peft has no such method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import own_format
from lorakit.adapters.config import PLACEMENTS, Bottleneck
from lorakit.adapters.layers import adapter_dtype
from lorakit.adapters.named import NamedDeltas, frozen
from lorakit.adapters.report import trainable_by_module
from lorakit.adapters.state import AdapterState, attach_state, detach_state, ensure_plain, require_state
from lorakit.errors import AdapterError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
# the child names under which decoder layers keep their sub-blocks, across model families
SUBLAYER_NAMES = {"attention": ("self_attn", "attn", "self_attention", "attention"),
                  "mlp": ("mlp", "feed_forward", "ffn")}
CHILD = "lorakit_bottleneck"


def apply(cfg: Bottleneck, model: nn.Module) -> nn.Module:
    """Add an adapter after each chosen sub-block, freeze the base; returns the model."""
    ensure_plain(model)
    paths = find_sublayers(model, cfg.placement)
    d = _hidden_size(model)
    model.requires_grad_(False)
    for path in paths:
        sublayer = model.get_submodule(path)
        weight = next(sublayer.parameters())
        adapter = BottleneckAdapter(d, cfg.size, cfg.activation, cfg.init_scale)
        setattr(sublayer, CHILD, adapter.to(weight.device, adapter_dtype(weight.dtype)))
        sublayer.register_forward_hook(_adapt_output)
    attach_state(model, AdapterState(method=cfg, targets=paths))
    return model


save, load_folder = own_format.save, own_format.load_folder  # lorakit's own folder format (own_format.py)


def named(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedDeltas:
    """A bottleneck folder as a named adapter: each sub-block's output y gets W_up f(W_down y) added."""
    cfg = own_format.method_config(raw, Bottleneck, folder / own_format.CONFIG_NAME)
    d, weight = _hidden_size(model), next(model.parameters())
    adapters = {path: BottleneckAdapter(d, cfg.size, cfg.activation, cfg.init_scale)
                .to(weight.device, adapter_dtype(weight.dtype)) for path in find_sublayers(model, cfg.placement)}
    params = {f"{path}.{CHILD}.{n}": p for path, adapter in adapters.items() for n, p in adapter.named_parameters()}
    own_format.copy_tensors(params, folder)
    frozen(params)
    deltas = {path: (lambda x, y, adapter=adapter: adapter.delta(y)) for path, adapter in adapters.items()}
    return NamedDeltas(name, deltas, str(folder), list(adapters.values()))


def merge(cfg: Bottleneck, model: nn.Module, **options: Any) -> nn.Module:
    """Refused: W_up f(W_down y) is nonlinear in y, so no weight of the base can absorb it."""
    raise AdapterError("bottleneck adapters cannot be merged: the adapter applies a nonlinearity to the "
                       "sub-block output, which no base weight can express; keep the adapter or unload it")


def unload(cfg: Bottleneck, model: nn.Module) -> nn.Module:
    """Remove every adapter and its hook: the base model as before `apply`."""
    for path in require_state(model).targets:
        sublayer = model.get_submodule(path)
        for key in [k for k, hook in sublayer._forward_hooks.items() if hook is _adapt_output]:
            del sublayer._forward_hooks[key]
        delattr(sublayer, CHILD)
    detach_state(model)
    return model


def count(cfg: Bottleneck, model: nn.Module) -> dict[str, int]:
    """Trainable numbers when `cfg` is applied to `model` (a meta-device skeleton will do):
    2 * size * d + size + d per adapted sub-block."""
    return trainable_by_module(apply(cfg, model))


class BottleneckAdapter(nn.Module):
    """y -> y + W_up f(W_down y + b_down) + b_up, with W_up and b_up zero at init."""

    report_group: ClassVar[str] = "bottleneck adapter"

    def __init__(self, d: int, size: int, activation: str, init_scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(d, size)  # weight (size, d)
        self.up = nn.Linear(size, d)  # weight (d, size)
        self.activation = activation
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: y passes unchanged
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_scale)
            for tensor in (self.down.bias, self.up.weight, self.up.bias):
                tensor.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        h = y if y.dtype == self.down.weight.dtype else y.to(self.down.weight.dtype)
        return (h + self.up(ACTIVATIONS[self.activation](self.down(h)))).to(y.dtype)

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to y: W_up f(W_down y + b_down) + b_up, in y's dtype."""
        h = y if y.dtype == self.down.weight.dtype else y.to(self.down.weight.dtype)
        return self.up(ACTIVATIONS[self.activation](self.down(h))).to(y.dtype)


def _adapt_output(sublayer: nn.Module, args, output):
    """Forward hook: pass the sub-block's hidden states (first element of a tuple) through its adapter."""
    adapter = getattr(sublayer, CHILD)
    if not adapter.adapter_enabled:
        return output
    if isinstance(output, tuple):
        return (adapter(output[0]),) + output[1:]
    return adapter(output)


def find_sublayers(model: nn.Module, placement: str) -> list[str]:
    """Paths of the decoder sub-blocks that `placement` selects, in model order."""
    kinds = PLACEMENTS[placement]
    found: list[str] = []
    for path, module in model.named_modules():
        children = dict(module.named_children())
        for kind in kinds:
            name = next((n for n in SUBLAYER_NAMES[kind] if n in children), None)
            if name is not None and _is_decoder_layer(children, kind):
                found.append(f"{path}.{name}" if path else name)
    for kind in kinds:
        if not any(p.rpartition(".")[2] in SUBLAYER_NAMES[kind] for p in found):
            raise AdapterError(f"bottleneck placement {placement!r}: {type(model).__name__} has no decoder layer "
                               f"with a {kind} sub-block named {' / '.join(SUBLAYER_NAMES[kind])}")
    return found


def _is_decoder_layer(children: dict[str, nn.Module], kind: str) -> bool:
    """A decoder layer holds both an attention and an MLP sub-block as direct children."""
    other = "mlp" if kind == "attention" else "attention"
    return any(n in children for n in SUBLAYER_NAMES[other])


def _hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(d, int):
        raise AdapterError(f"{type(model).__name__} has no config.hidden_size to size the bottleneck adapters by")
    return d
