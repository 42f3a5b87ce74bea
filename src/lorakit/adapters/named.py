"""Bottleneck, MoLE and prompt-tuning folders as named adapters of `adapters.multi` (switched by name or per row).

A bottleneck or MoLE named adapter holds, per hooked module path, a function (x, y) -> the amount
added to that module's output y (x: the module's input): a MoLE layer adds its expert mixture of x
to a linear layer's output, a bottleneck adds W_up f(W_down y) to a sub-block's output. The adapter
modules stay off the model's module tree (the base model is not changed); `multi`'s hooks call
`delta`. A prompt-tuning named adapter hooks no module: it holds its virtual tokens, which one pair
of model-level hooks (`attach_prompt_hooks`) puts in front of the rows that use it; rows of one
batch with prompts of other lengths, or none, have the rest of the front masked out on the left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lorakit.adapters import own_format, prompt_tuning
from lorakit.adapters.bottleneck import CHILD, Bottleneck, BottleneckAdapter, _hidden_size, find_sublayers
from lorakit.adapters.layers import adapter_dtype
from lorakit.adapters.match import find_targets
from lorakit.adapters.mole import MoLE, MoLELayer
from lorakit.adapters.registry import method_for_folder
from lorakit.errors import AdapterError

Delta = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]  # (module input, module output) -> added


@dataclass
class NamedDeltas:
    """One named adapter: module path -> the function that gives what it adds to that module's output."""

    name: str
    deltas: dict[str, Delta]
    source: str = ""
    modules: list[nn.Module] = field(default_factory=list)  # kept alive (and movable) with the adapter

    @property
    def paths(self) -> list[str]:
        """The module paths this adapter hooks."""
        return list(self.deltas)

    def delta(self, path: str, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the output `y` of module `path` (given its input `x`)."""
        return self.deltas[path](x, y)


@dataclass
class NamedPrompt:
    """One named prompt-tuning adapter: its (n, d) virtual tokens; it hooks no module (`paths` is empty)."""

    name: str
    embeddings: torch.Tensor
    source: str = ""
    paths: list[str] = field(default_factory=list)


def read_named(model: nn.Module, name: str, folder: Path) -> NamedDeltas | NamedPrompt | None:
    """The named adapter of a bottleneck, MoLE or prompt-tuning folder; None for other folders (e.g. PEFT LoRA)."""
    raw = _peek(folder / own_format.CONFIG_NAME)
    reader = READERS.get(method_for_folder(raw.get("lorakit_method") or raw.get("peft_type")))
    return None if reader is None else reader(model, name, folder, raw)


def attach_prompt_hooks(model: nn.Module, prompts_of: prompt_tuning.RowPrompts) -> list:
    """Hooks on `model` that put each row's virtual tokens (`prompts_of(batch)`) in front of its input and cut
    their logits off again; returns the handles (remove them to take the hooks off)."""
    run = prompt_tuning.PromptRun()

    def prepend(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return prompt_tuning.prepend_virtual(module, args, kwargs, run, prompts_of)

    return [model.register_forward_pre_hook(prepend, with_kwargs=True),
            model.register_forward_hook(lambda module, args, output: prompt_tuning.strip_virtual(run, output))]


def _peek(path: Path) -> dict:
    try:
        return own_format.read_config(path.parent)
    except AdapterError:
        return {}  # the LoRA reader reports what is wrong with the folder


def _mole(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedDeltas:
    cfg = own_format.method_config(raw, MoLE, folder / own_format.CONFIG_NAME)
    layers = {path: MoLELayer(model.get_submodule(path), cfg) for path in find_targets(model, cfg.targets)}
    _load_frozen({f"{path}.{n}": p for path, layer in layers.items()
                  for n, p in layer.named_parameters() if n not in ("weight", "bias")}, folder)
    deltas = {path: (lambda x, y, layer=layer: layer.mixture(x).to(y.dtype)) for path, layer in layers.items()}
    return NamedDeltas(name, deltas, str(folder), list(layers.values()))


def _bottleneck(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedDeltas:
    cfg = own_format.method_config(raw, Bottleneck, folder / own_format.CONFIG_NAME)
    d, weight = _hidden_size(model), next(model.parameters())
    adapters = {path: BottleneckAdapter(d, cfg.size, cfg.activation, cfg.init_scale)
                .to(weight.device, adapter_dtype(weight.dtype)) for path in find_sublayers(model, cfg.placement)}
    _load_frozen({f"{path}.{CHILD}.{n}": p for path, adapter in adapters.items()
                  for n, p in adapter.named_parameters()}, folder)
    deltas = {path: (lambda x, y, adapter=adapter: adapter.delta(y)) for path, adapter in adapters.items()}
    return NamedDeltas(name, deltas, str(folder), list(adapters.values()))


def _load_frozen(params: dict[str, torch.Tensor], folder: Path) -> None:
    own_format.copy_tensors(params, folder)
    for param in params.values():
        param.requires_grad_(False)  # named adapters serve inference


def _prompt(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedPrompt:
    _, embeddings = prompt_tuning.read_folder(model, folder, raw)
    device = model.get_input_embeddings().weight.device
    return NamedPrompt(name, embeddings.to(device, torch.float32), str(folder))  # fp32, as VirtualTokens keeps it


# method (found by its folder_type in the registry) -> how a folder of it becomes a named adapter
READERS: dict[type, Callable[[nn.Module, str, Path, dict], NamedDeltas | NamedPrompt]] = {
    MoLE: _mole, Bottleneck: _bottleneck, prompt_tuning.PromptTuning: _prompt}
