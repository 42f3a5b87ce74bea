"""Getting a model ready to train and back again: seeds, precision, checkpointing, optimizer."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn

from lorakit.data.packing import packed_forward
from lorakit.errors import ConfigError, LorakitError
from lorakit.train.auto import resolve_train
from lorakit.train.base_dropout import switched_off as base_dropout_policy
from lorakit.train.config import TrainConfig
from lorakit.train.precision import PRECISIONS
from lorakit.train.varlen import enabled as varlen_enabled


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) for every parameter with requires_grad, in module order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LorakitError(
            "the model has no trainable parameters (requires_grad=True): apply an adapter method, "
            "or method 'full' for full fine-tuning, before training"
        )
    return named


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; fused kernel where the build has one, else foreach."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    options = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **options)


def _enable_checkpointing(model: nn.Module) -> contextlib.AbstractContextManager:
    """Turn on non-reentrant activation checkpointing of a Hugging Face model; undo on exit."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support activation checkpointing "
            "(it needs a Hugging Face model whose layers support it)"
        )
    had_hook = hasattr(model, "_require_grads_hook")
    # Non-reentrant checkpointing builds the graph from the recomputed forward, so gradients reach
    # adapter weights even when no input of a checkpointed block requires grad (frozen embeddings).
    if enable.__name__ == "activation_checkpointing_enable":
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        try:
            yield
        finally:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            if not had_hook and hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()

    return restore()


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models build a KV cache in training forwards unless config.use_cache is off."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    before = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated blocks: the longest ModuleList whose items all share one class."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            best = module if best is None or len(module) > len(best) else best
    return best


@contextlib.contextmanager
def compiled_layers(model: nn.Module, backend: str = "inductor") -> Iterator[nn.Module]:
    """Compile each decoder layer in place (shapes marked dynamic); yields the callable to run.

    Layers share one compiled graph (same code, parameters passed as inputs), so a 30-layer
    model compiles once, and dynamic shapes keep packed batches of varying width from
    recompiling. Without a layer list the whole model is compiled instead. Undone on exit.
    """
    layers = decoder_layers(model)
    if layers is None:
        yield torch.compile(model, backend=backend, dynamic=True)
        return
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    try:
        yield model
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # nn.Module.compile's slot; None restores eager calls


@contextlib.contextmanager
def prepared(model: nn.Module, cfg: TrainConfig) -> Iterator[nn.Module]:
    """Ready `model` for training per `cfg`; yields the callable to run (compiled or not).

    Precision casts stay after exit (they are the weights the caller saves); the base model's
    dropout (train.base_dropout, train/base_dropout.py), checkpointing, the KV-cache switch, the
    attention implementation (per-example attention for packed rows where it applies,
    train/varlen.py), BLOOM's packed ALiBi (data/packing.py `packed_forward`) and train/eval mode
    are restored. An auto precision or compile (train/auto.py) is resolved here when the caller has not:
    the run's length is not known here, so compile auto stays off.
    """
    cfg, _ = resolve_train(cfg, model)  # `train` passes a resolved cfg; a direct call gets the auto rules, unplanned
    was_training = model.training
    precision = PRECISIONS[cfg.precision]
    precision.prepare(model)
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        stack.enter_context(base_dropout_policy(model, cfg.base_dropout, lambda: precision.autocast(device)))
        if cfg.gradient_checkpointing:
            stack.enter_context(_enable_checkpointing(model))
        stack.enter_context(_no_kv_cache(model))
        stack.enter_context(packed_forward(model))  # BLOOM: ALiBi per packed example
        stack.enter_context(varlen_enabled(model, lambda: precision.autocast(device)))
        model.train()
        call = stack.enter_context(compiled_layers(model)) if cfg.compile else model
        try:
            yield call
        finally:
            model.train(was_training)
