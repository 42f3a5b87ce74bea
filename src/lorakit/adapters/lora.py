"""LoRA: the method config and its injection into a model.

`lorakit.apply(model, LoRA(...))` wraps each target layer in a `LoRALayer`, freezes everything
else, makes the chosen biases trainable, and swaps each module in `modules_to_save` for a
trainable copy, with peft's semantics throughout, so the adapter saves in PEFT format.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import nn

from lorakit.adapters.layers import LoRALayer, layer_kind
from lorakit.adapters.match import find_targets, match_spec
from lorakit.adapters.param_lora import ParamLoRA, find_param_targets
from lorakit.adapters.registry import register_method
from lorakit.adapters.state import (AdapterState, attach_state, ensure_plain, is_inside, replace_module,
                                    set_parameter)
from lorakit.errors import AdapterError, ConfigError

BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = ("kaiming", "gaussian")


@register_method
@dataclass
class LoRA:
    """Low-rank adaptation (Hu et al. 2021, arXiv:2106.09685): W' = W + s * B A on target layers."""

    name: ClassVar[str] = "lora"
    layer_type: ClassVar[type] = LoRALayer  # the layer `inject` wraps targets in (DoRA swaps in its own)

    r: int = 8
    """Rank of the update B A; each target layer trains r * (d_in + d_out) numbers."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by s = alpha / r (alpha / sqrt(r) with rslora)."""
    targets: str | list[str] = "all-linear"
    """Modules to adapt: names, dotted suffixes, regexes (full match), a list of those, or 'all-linear'
    ([] adapts parameters only, see target_parameters)."""
    target_parameters: list[str] = field(default_factory=list)
    """Parameters to adapt directly, as peft's target_parameters: names or dotted suffixes such as
    'experts.gate_up_proj', for MoE experts stored as 3-D tensors (one LoRA pair per expert); needs dropout 0."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch's input (training only); 0 disables it."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Biases that train: none, all biases of the model, or only those of the adapted layers."""
    rslora: bool = False
    """Rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full (as copies) and saved with the adapter, e.g. ['lm_head']."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Init of A: Kaiming-uniform (peft's default) or Gaussian with std 1/r; B always starts at 0."""

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        for message in _config_problems(self):
            raise ConfigError(f"LoRA: {message}")

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject LoRA into `model` in place (see the module docstring); returns the model."""
        ensure_plain(model)
        saved = resolve_modules_to_save(model, self.modules_to_save)
        module_targets = self.targets if self.targets or not self.target_parameters else None
        paths = [p for p in find_targets(model, module_targets) if not is_inside(p, saved)] if module_targets else []
        if module_targets and not paths:
            raise AdapterError(f"LoRA targets {self.targets!r} select only modules listed in modules_to_save; "
                               "nothing is left to adapt")
        return inject(model, self, paths, saved)


def _config_problems(cfg: LoRA) -> list[str]:
    """Every field-level mistake in a LoRA config (model-dependent checks happen in `inject`)."""
    problems = []
    if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
        problems.append(f"r must be a positive integer (the rank), got {cfg.r!r}")
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, numbers.Real) or cfg.alpha <= 0:
        problems.append(f"alpha must be a positive number, got {cfg.alpha!r}")
    if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, numbers.Real) or not 0 <= cfg.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.bias not in BIAS_MODES:
        problems.append(f"bias must be one of {', '.join(BIAS_MODES)}; got {cfg.bias!r}")
    if cfg.init not in INIT_METHODS:
        problems.append(f"init must be one of {', '.join(INIT_METHODS)}; got {cfg.init!r}")
    specs = [cfg.targets] if isinstance(cfg.targets, str) else cfg.targets
    parameters_only = isinstance(specs, (list, tuple)) and not specs and bool(cfg.target_parameters)
    if not isinstance(specs, (list, tuple)) or not (specs or parameters_only) or not all(
            isinstance(s, str) and s for s in specs):
        problems.append(f"targets must be a module name, a pattern, 'all-linear' or a non-empty list; "
                        f"got {cfg.targets!r}")
    if not isinstance(cfg.target_parameters, (list, tuple)) or not all(
            isinstance(s, str) and s for s in cfg.target_parameters):
        problems.append(f"target_parameters must be a list of parameter names; got {cfg.target_parameters!r}")
    elif cfg.target_parameters and cfg.name != "lora":
        problems.append(f"target_parameters is supported by method lora only, not {cfg.name}")
    elif cfg.target_parameters and cfg.dropout:
        problems.append("dropout must be 0 with target_parameters: dropout on the input of a parameter's "
                        "product cannot be expressed (peft has the same rule)")
    if not all(isinstance(s, str) and s for s in cfg.modules_to_save):
        problems.append(f"modules_to_save must be a list of module names; got {cfg.modules_to_save!r}")
    return problems


def resolve_modules_to_save(model: nn.Module, specs: list[str]) -> list[str]:
    """Paths of the modules named by `specs` (same rules as targets), outermost only."""
    names = [n for n, _ in model.named_modules() if n]
    found: set[str] = set()
    for spec in specs:
        hits = match_spec(spec, names)
        if not hits:
            raise AdapterError(f"modules_to_save entry {spec!r} matches no module of {type(model).__name__}")
        found.update(hits)
    return [n for n in names if n in found and not is_inside(n, found - {n})]


def inject(model: nn.Module, cfg: LoRA, paths: list[str], saved: list[str]) -> nn.Module:
    """Wrap `paths` in LoRA layers, freeze the rest, set bias modes and modules_to_save."""
    modules = dict(model.named_modules())
    for path in paths:
        _check_rank(path, modules[path], cfg.r)
    owners = find_param_targets(model, cfg.target_parameters) if cfg.target_parameters else {}
    for path in owners:
        if is_inside(path, saved) or any(is_inside(path, [p]) or is_inside(p, [path]) for p in paths):
            raise AdapterError(f"module {path!r} holds a target parameter but also lies in targets or "
                               "modules_to_save; adapt it one way only")
    model.requires_grad_(False)
    state = AdapterState(method=copy.deepcopy(cfg), targets=list(paths), saved_modules=list(saved))
    for path in paths:  # model order, then the parameters: the same random-number use as peft
        layer = cfg.layer_type(modules[path], cfg.r, cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout,
                               init=cfg.init)
        replace_module(model, path, layer)
    for path, names in owners.items():
        replace_module(model, path, ParamLoRA(modules[path], names, cfg.r, cfg.alpha, rslora=cfg.rslora,
                                              init=cfg.init))
    for path, param in _trained_biases(model, cfg.bias, paths, saved):
        state.bias_backup[path] = param.detach().clone()
        param.requires_grad_(True)
    for module_path in saved:
        _swap_in_trainable_copy(model, module_path, state)
    attach_state(model, state)
    return model


def _check_rank(path: str, module: nn.Module, r: int) -> None:
    kind = layer_kind(module)
    d_in, d_out = kind.dims(module.weight)
    if r > min(d_in, d_out):
        raise AdapterError(f"rank r={r} is larger than min(d_in, d_out) = {min(d_in, d_out)} of module {path!r} "
                           f"({type(module).__name__} {d_in} -> {d_out}); use r <= {min(d_in, d_out)}")


def _trained_biases(model: nn.Module, mode: str, paths: list[str], saved: list[str]):
    """(path, parameter) of the biases that train under bias `mode` (peft's rules)."""
    if mode == "none":
        return []
    if mode == "lora_only":
        return [(f"{p}.bias", model.get_submodule(p).bias) for p in paths if model.get_submodule(p).bias is not None]
    return [(n, p) for n, p in model.named_parameters()
            if (n == "bias" or n.endswith(".bias")) and not is_inside(n, saved)]


def _swap_in_trainable_copy(model: nn.Module, module_path: str, state: AdapterState) -> None:
    """Give a modules_to_save module trainable copies of its parameters, keeping the originals.

    Copies also untie a module from weights it shares (e.g. a tied lm_head), like peft's copy."""
    for name, param in list(model.get_submodule(module_path).named_parameters()):
        path = f"{module_path}.{name}"
        state.originals[path] = param
        set_parameter(model, path, nn.Parameter(param.detach().clone(), requires_grad=True))
