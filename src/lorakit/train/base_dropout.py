"""The base model's own dropout while training: an explicit policy, `train.base_dropout`.

Hugging Face configs carry the dropout their model was pre-trained with (GPT-2 and OPT: 0.1;
most recent decoders: 0). A model trains in train mode, so that dropout is live during
fine-tuning unless someone turns it off, and nobody chose it: it is a regulariser inherited from
pre-training, it makes two runs that should agree (packed vs unpacked rows, 1 vs 2 processes)
differ, and with adapters it only adds noise to the gradient of weights that are not its own.

- "off" (default): every dropout of the model itself is set to p = 0 while `train` runs and
  restored afterwards. Adapter dropout (`lora.dropout`, ...) is not touched: that one the user
  sets. A careful practitioner fine-tuning a pre-trained LM turns inherited dropout off and
  regularises on purpose (adapter dropout, weight decay, fewer steps); it is also what makes a
  run reproducible across batch layouts.
- "keep": the model's dropout stays as its config says (what a plain Trainer run does).

Dropout lives in two forms in transformers' models: `nn.Dropout` modules, and float attributes
read by the forward (`attention_dropout`, `hidden_dropout`, `activation_dropout`, `attn_pdrop`,
...). Both are found by `model_dropout` and zeroed by `switched_off`, which then proves the
result: two forwards in train mode under different random states must give identical logits;
if not, some dropout was out of reach and the run is refused with one line instead of training
with a policy it claims but does not have.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.config import BASE_DROPOUT_MODES

_NAME_PARTS = ("dropout", "pdrop")  # attribute names that hold a dropout probability


def _own_module(module: nn.Module) -> bool:
    """True for lorakit's adapter modules, whose dropout is the user's choice, not the base's."""
    return type(module).__module__.startswith("lorakit.")


def _is_probability(attribute: str, value: object) -> bool:
    return (isinstance(value, float) and 0 < value < 1 and any(part in attribute for part in _NAME_PARTS))


def model_dropout(model: nn.Module) -> list[tuple[object, str, float]]:
    """(owner, attribute, p) for every non-zero dropout of the model itself (not of adapters).

    Owners are `nn.Dropout` modules (attribute "p"), modules holding a float such as
    `attention_dropout`, and the model configs that some forwards read at run time.
    """
    found: list[tuple[object, str, float]] = []
    configs: dict[int, object] = {}
    for module in model.modules():
        if _own_module(module):
            continue
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, (int, float, str)):
            configs[id(config)] = config
        if isinstance(module, nn.Dropout):
            if module.p > 0:
                found.append((module, "p", float(module.p)))
            continue
        found += [(module, name, value) for name, value in vars(module).items() if _is_probability(name, value)]
    for config in configs.values():
        found += [(config, name, value) for name, value in vars(config).items() if _is_probability(name, value)]
    return found


def describe(model: nn.Module, mode: str) -> str:
    """The one line a run prints about the policy in force on `model`."""
    levels = sorted({p for _, _, p in model_dropout(model)})
    if not levels:
        return "base dropout: none in this model"
    shown = ", ".join(f"{p:g}" for p in levels)
    if mode == "off":
        return (f"base dropout: off (the model's own dropout {shown} is set to 0 while training; "
                "train.base_dropout: keep keeps it)")
    return f"base dropout: kept at {shown} (train.base_dropout: off turns it off)"


def _probe_input(model: nn.Module) -> torch.Tensor | None:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        return None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, embeddings.num_embeddings, (1, 8), generator=generator).to(device)


def _still_random(model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> bool:
    """True when two train-mode forwards (adapters in eval mode) under different random states differ."""
    ids = _probe_input(model)
    if ids is None:
        return False
    was_training = model.training
    model.train()
    for module in model.modules():
        if _own_module(module):
            module.eval()  # adapter dropout is the user's choice: not part of what is probed
    try:
        with torch.no_grad(), autocast(), torch.random.fork_rng(
                devices=[] if ids.device.type == "cpu" else [ids.device]):
            outputs = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                outputs.append(model(input_ids=ids, use_cache=False).logits)
    finally:
        model.train(was_training)
    return not torch.equal(outputs[0], outputs[1])


@contextlib.contextmanager
def switched_off(model: nn.Module, mode: str,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Iterator[None]:
    """Apply `mode` ("off" or "keep") to the model's own dropout while inside; restore on exit.

    `autocast` gives the run's precision context, under which the probe's forwards run."""
    if mode not in BASE_DROPOUT_MODES:
        raise ConfigError(f"train.base_dropout must be one of {', '.join(BASE_DROPOUT_MODES)}; got {mode!r}")
    levels = model_dropout(model) if mode == "off" else []
    for owner, attribute, _ in levels:
        setattr(owner, attribute, 0.0)
    try:
        if mode == "off" and _still_random(model, autocast):
            raise ConfigError(f"train.base_dropout: off, but {type(model).__name__} is still random in train mode "
                              "after its dropout was set to 0 (a dropout lorakit cannot reach, or noise such as "
                              "router jitter); set train.base_dropout: keep to train with it")
        yield
    finally:
        for owner, attribute, p in levels:
            setattr(owner, attribute, p)
