"""apply / save / load / add-by-name / merge / unload / count for every method, through the one contract.

Each call finds the method's implementation module (adapters/registry.py) from what it is given:
the config (`apply`, `count`), the adapter record on the model (`save_adapter`, `merge`, `unload`),
or the folder's adapter_config.json (`load_adapter`, `read_named`): peft's `peft_type` ("LORA",
"PROMPT_TUNING") or lorakit's own `lorakit_method` ("bottleneck", "mole"), each declared by its
method's config class as `folder_type`. A folder that names neither is read as PEFT LoRA, whose
loader says what is wrong with it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from torch import nn

from lorakit.adapters import ops, peft_format
from lorakit.adapters.config import Full, LoRA
from lorakit.adapters.registry import METHODS, implementation, method_for_folder, own_folder_types
from lorakit.adapters.state import get_state, set_parameter
from lorakit.errors import AdapterError, ConfigError

SWITCH = "adapter_enabled"  # the attribute every module that changes the base's output honours in its forward


def _checked(method_cfg: Any) -> Any:
    if type(method_cfg) not in METHODS.values():
        raise ConfigError(f"{method_cfg!r} is not a method config; expected an instance of one of "
                          f"{', '.join(cls.__name__ for cls in METHODS.values())}")
    return method_cfg


def apply(model: nn.Module, method_cfg: Any) -> nn.Module:
    """Apply a method config (an instance of a class in METHODS) to `model` in place; returns it."""
    return implementation(_checked(method_cfg)).apply(method_cfg, model)


def count(model: nn.Module, method_cfg: Any) -> dict[str, int]:
    """Trainable numbers per module group once `method_cfg` is applied to `model` (changed in place).
    Only shapes are read, so a skeleton built on the meta device (no weights) is enough."""
    return implementation(_checked(method_cfg)).count(method_cfg, model)


def _method_of(model: nn.Module) -> tuple[Any, ModuleType]:
    """The model's method config and implementation; a model without a record is handled as LoRA."""
    state = get_state(model)
    method = state.method if state is not None else LoRA()
    return method, implementation(method)


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None, *,
                 tokenizer: Any = None, state_dict: dict | None = None) -> Path:
    """Write the model's adapter folder (PEFT format for LoRA, DoRA, QLoRA and prompt tuning, lorakit's own for
    bottleneck and MoLE; full fine-tuning: the whole model, with `tokenizer` and FSDP2's gathered `state_dict`)."""
    method, module = _method_of(model)
    return module.save(method, model, path, base_model_name_or_path, tokenizer=tokenizer, state_dict=state_dict)


def _folder_method(folder: Path) -> tuple[type, dict]:
    if not (folder / peft_format.CONFIG_NAME).exists() and (folder / "config.json").is_file():
        return Full, {}  # a whole model (what full fine-tuning saves), which Full's loader explains
    raw = _peek_config(folder / peft_format.CONFIG_NAME)
    method = method_for_folder(raw.get("lorakit_method") or raw.get("peft_type"))
    if method is None and "lorakit_method" in raw:
        raise AdapterError(f"{folder / peft_format.CONFIG_NAME}: lorakit_method {raw['lorakit_method']!r} has no "
                           f"folder loader; lorakit's own folders hold one of: {', '.join(own_folder_types())}")
    return method or LoRA, raw  # anything else: the LoRA loader reports what is wrong with the folder


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter folder onto `base_model` in place, with the loader its config names."""
    method, raw = _folder_method(Path(path))
    return implementation(method).load_folder(base_model, Path(path), raw)


def read_named(model: nn.Module, name: str, path: str | Path) -> Any:
    """The folder at `path` as the named adapter `name` (adapters/named.py), by its method's `named`."""
    method, raw = _folder_method(Path(path))
    return implementation(method).named(model, name, Path(path), raw)


def _peek_config(path: Path) -> dict:
    """The config as a dict when it is readable JSON, else {} (the LoRA loader reports the problem)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def merge(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Fold the adapter into the base weights (see `ops.merge`); methods that cannot merge say why."""
    method, module = _method_of(model)
    return module.merge(method, model, **kwargs)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge(model, keep_layers=True)` (see `ops.unmerge`)."""
    return ops.unmerge(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: the plain base model as before `apply`."""
    method, module = _method_of(model)
    return module.unload(method, model)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes exactly its base model (the model before `apply`), with no second copy.

    Every module that changes the base's output has an `adapter_enabled` switch its forward honours (LoRA, DoRA
    and QLoRA layers, LoRA on parameters, MoLE layers, prompt tuning's virtual tokens, bottleneck adapters): each
    is switched off, so each layer runs its base arithmetic alone and the logits equal the base model's bit for
    bit. modules_to_save use their original parameters and biases trained by a bias mode their base values for
    the block. This is the reference model of preference tuning (train/preference.py). Full fine-tuning has no
    adapter to switch off; a merged adapter (merge(keep_layers=True)) must be unmerged first.
    """
    state = get_state(model)
    if state is None:
        raise AdapterError(f"{type(model).__name__} carries no lorakit adapter to switch off")
    if isinstance(state.method, Full):
        raise AdapterError("full fine-tuning has no adapter to switch off: its base is the weights before training "
                           "(keep a copy, or precompute what is needed from it)")
    switches = [module for module in model.modules() if isinstance(module.__dict__.get(SWITCH), bool)]
    merged = [module for module in switches if getattr(module, "merged", False)]
    if merged:
        raise AdapterError("the adapter is merged into the base weights (merge(keep_layers=True)); unmerge it "
                           "before switching it off")
    swapped = {path: model.get_parameter(path) for path in [*state.originals, *state.bias_backup]}
    try:
        for module in switches:
            setattr(module, SWITCH, False)
        for path, original in state.originals.items():
            set_parameter(model, path, ops.like(original, swapped[path]))
        for path, values in state.bias_backup.items():
            set_parameter(model, path, nn.Parameter(values.to(swapped[path]), requires_grad=False))
        yield model
    finally:
        for module in switches:
            setattr(module, SWITCH, True)
        for path, param in swapped.items():
            set_parameter(model, path, param)


# method settings that only say how a fresh adapter is initialised: a folder may differ from the run's method
# section in these and still hold the same adapter
_START_ONLY = frozenset({"targets", "init", "init_from", "init_text", "tokenizer_name_or_path", "init_scale",
                         "router_init"})


def _adapter_shape(model: nn.Module) -> dict[str, Any]:
    """What an applied adapter is, for comparing two: its method's settings (without the init-only ones) and the
    name and shape of every trainable tensor (which pins targets, rank, modules_to_save, trained biases, ...)."""
    method = get_state(model).method
    settings = {f"method.{f.name}": getattr(method, f.name) for f in dataclasses.fields(method)
                if f.name not in _START_ONLY}
    tensors = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    return {**settings, "trainable tensors": tensors}


def apply_from_folder(model: nn.Module, method_cfg: Any, folder: str | Path) -> nn.Module:
    """`apply(model, method_cfg)` with the adapter's weights read from a saved adapter folder instead of initialised:
    the run continues training that adapter (e.g. DPO on top of an SFT adapter). Returns the model.

    The adapter is first built from `method_cfg` as a fresh run would build it, then removed, and the folder is
    loaded with its method's own loader (which checks every tensor against the model). Both must be the same
    adapter: the same method settings (alpha, rslora, dropout, bias, ...; the init settings may differ, and a
    QLoRA run takes a LoRA folder onto its 4-bit base) and the same trainable tensors by name and shape (targets,
    rank, modules_to_save, ...); else a ConfigError names each difference. The adapter state records the folder
    (`started_from`).
    """
    folder = Path(folder)
    if isinstance(_checked(method_cfg), Full):
        raise ConfigError("model.init_adapter: full fine-tuning starts from a whole model: give that folder as "
                          "model.name_or_path instead")
    if not (folder / peft_format.CONFIG_NAME).is_file():
        raise ConfigError(f"model.init_adapter: {folder} holds no {peft_format.CONFIG_NAME}; give the adapter "
                          "folder of an earlier run (its adapter/ folder)")
    apply(model, method_cfg)
    fresh = _adapter_shape(model)
    method, module = _method_of(model)
    module.unload(method, model)
    loader, raw = _folder_method(folder)
    implementation(loader).load_folder(model, folder, raw)
    loaded = _adapter_shape(model)
    differences = [f"{key} is {fresh[key]!r} in the method section but {loaded[key]!r} there"
                   for key in fresh.keys() & loaded.keys() if key != "trainable tensors" and fresh[key] != loaded[key]]
    ours, theirs = fresh["trainable tensors"], loaded["trainable tensors"]
    if ours != theirs:
        only_ours, only_theirs = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        reshaped = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
        differences.append(
            "the trainable tensors differ (" + "; ".join(part for part in (
                f"only the method section's: {only_ours[:3]}" if only_ours else "",
                f"only the folder's: {only_theirs[:3]}" if only_theirs else "",
                f"{reshaped[0]} is {ours[reshaped[0]]} here but {theirs[reshaped[0]]} there" if reshaped else "")
                if part) + ")")
    if differences:
        loaded_method, loaded_module = _method_of(model)
        loaded_module.unload(loaded_method, model)
        raise ConfigError(f"model.init_adapter: the method section must describe the adapter in {folder}, which "
                          f"the run trains further: {'; '.join(sorted(differences))}")
    state = get_state(model)
    state.method, state.started_from = copy.deepcopy(method_cfg), str(folder)
    return model
