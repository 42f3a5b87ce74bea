"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): n trained virtual-token embeddings.

The base model is frozen; a (n, d) table `lorakit_prompt.embeddings` is prepended to the input
embeddings of every row. A forward pre-hook on the model does the prepending (and widens a 2-D
attention_mask, position_ids, cache_position and labels to match); a forward hook cuts the n
virtual positions off the logits, so callers see logits aligned with their own T tokens, as the
training loop expects. In generation the prompt enters once: later steps find it in the cache
and only widen the mask and shift positions by n. Packed batches (4-D masks) are refused: every
packed example would need its own copy of the prompt. The same hook code serves named prompt
adapters (adapters/named.py), whose rows in one batch may carry prompts of different lengths, or none.

Saved in peft's PROMPT_TUNING folder format (adapter_config.json + `prompt_embeddings`).
"""
from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapters.config import PromptTuning
from lorakit.adapters.named import NamedPrompt
from lorakit.adapters.report import trainable_by_module
from lorakit.adapters.state import AdapterState, attach_state, detach_state, ensure_plain
from lorakit.errors import AdapterError, ConfigError
from lorakit.labels import IGNORE_INDEX
from lorakit.models import load_tokenizer
from lorakit.permissions import share

CHILD = "lorakit_prompt"
PEFT_KEY = "prompt_embeddings"


def apply(cfg: PromptTuning, model: nn.Module) -> nn.Module:
    """Add the virtual tokens and their hooks, freeze the base; returns the model."""
    ensure_plain(model)
    table = model.get_input_embeddings().weight  # (V, d)
    prompt = VirtualTokens(cfg.num_virtual_tokens, table.shape[1]).to(table.device)
    with torch.no_grad():
        prompt.embeddings.copy_(_initial_embeddings(cfg, model, table))
    model.requires_grad_(False)
    setattr(model, CHILD, prompt)
    model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
    model.register_forward_hook(_strip_prompt_logits)
    attach_state(model, AdapterState(method=cfg, targets=[CHILD]))
    return model


def _initial_embeddings(cfg: PromptTuning, model: nn.Module, table: torch.Tensor) -> torch.Tensor:  # (n, d)
    n = cfg.num_virtual_tokens
    if cfg.init_from == "random":
        return torch.randn(n, table.shape[1], device=table.device) * table.float().std()
    name = cfg.tokenizer_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise AdapterError("PromptTuning init_from 'text' needs tokenizer_name_or_path: the model has no "
                           "name_or_path")
    ids = load_tokenizer(name)(cfg.init_text)["input_ids"]
    ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat or cut to n tokens, as peft does
    return table[torch.tensor(ids, device=table.device)].float()


def save(cfg: PromptTuning, model: nn.Module, folder: str | Path, base: str | None = None, *,
         tokenizer: Any = None, state_dict: dict | None = None) -> Path:
    """Write peft's PROMPT_TUNING folder (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    embeddings = getattr(model, CHILD).embeddings.detach().cpu().contiguous()
    save_file({PEFT_KEY: embeddings}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    share(folder / "adapter_model.safetensors")  # the user's umask, not safetensors' 0600
    config = peft_config(cfg, model, embeddings.shape[1], base)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_folder(base_model: nn.Module, folder: Path, raw: dict) -> nn.Module:
    """Apply a peft PROMPT_TUNING folder (saved by lorakit or peft) to `base_model`."""
    cfg, embeddings = read_folder(base_model, folder, raw)
    apply(cfg, base_model)
    with torch.no_grad():
        getattr(base_model, CHILD).embeddings.copy_(embeddings)
    return base_model


def named(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedPrompt:
    """A PROMPT_TUNING folder as a named adapter: its virtual tokens, in fp32 as VirtualTokens keeps them."""
    _, embeddings = read_folder(model, folder, raw)
    device = model.get_input_embeddings().weight.device
    return NamedPrompt(name, embeddings.to(device, torch.float32), str(folder))


def merge(cfg: PromptTuning, model: nn.Module, **options: Any) -> nn.Module:
    """Refused: virtual tokens are extra inputs, not a change to any weight."""
    raise AdapterError("prompt tuning cannot be merged: its virtual tokens are extra inputs, not a change to "
                       "any base weight; keep the adapter or unload it")


def unload(cfg: PromptTuning, model: nn.Module) -> nn.Module:
    """Remove the virtual tokens and hooks: the base model as before `apply`."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if hook in (_prepend_prompt, _strip_prompt_logits)]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    delattr(model, CHILD)
    detach_state(model)
    return model


def count(cfg: PromptTuning, model: nn.Module) -> dict[str, int]:
    """Trainable numbers when `cfg` is applied to `model` (a meta-device skeleton will do): n * d."""
    return trainable_by_module(apply(cfg, model))


def attach_prompt_hooks(model: nn.Module, prompts_of: RowPrompts) -> list:
    """Hooks on `model` that put each row's virtual tokens (`prompts_of(batch)`) in front of its input and cut
    their logits off again (named prompt adapters, adapters/multi.py); returns the handles."""
    run = PromptRun()

    def prepend(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return prepend_virtual(module, args, kwargs, run, prompts_of)

    return [model.register_forward_pre_hook(prepend, with_kwargs=True),
            model.register_forward_hook(lambda module, args, output: strip_virtual(run, output))]


class VirtualTokens(nn.Module):
    """The trained (n, d) table; `run` carries what one prompted forward's hooks pass on."""

    report_group: ClassVar[str] = "prompt (virtual tokens)"

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(n, d))  # (n, d)
        self.run = PromptRun()
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: no virtual tokens


@dataclass
class PromptRun:
    """What the hooks of a prompted model pass on: from its pre-hook to its forward hook, and from the first
    (uncached) step of a generation to the steps that find the virtual tokens in the KV cache."""

    pending_length: int | None = None
    """The caller's T while a prompted forward runs (its logits are cut to the last T positions)."""
    front: int = 0
    """Positions in front of the caller's tokens that the last uncached step put in the cache."""


RowPrompts = Callable[[int], Sequence[torch.Tensor | None]]  # batch size -> each row's (n_r, d) prompt or None


def cached_length(cache: Any) -> int:
    """Positions already in a KV cache (0: none, or no cache): the forward that sees 0 is a prompt pass."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: put the virtual tokens in front of the input (or account for them in the cache)."""
    prompt: VirtualTokens = getattr(model, CHILD)
    if not prompt.adapter_enabled:  # the plain model: nothing in front, nothing to cut off
        prompt.run.pending_length = None
        return args, kwargs
    return prepend_virtual(model, args, kwargs, prompt.run, lambda batch: [prompt.embeddings] * batch)


def prepend_virtual(model: nn.Module, args: tuple, kwargs: dict, run: PromptRun,
                    prompts_of: RowPrompts) -> tuple[tuple, dict]:
    """The pre-hook's work, row by row: row r gets its own n_r virtual tokens (None: none).

    The front is as wide as the longest prompt; a row with a shorter one (or none) has the rest of
    the front masked out on its left, like left padding, and its positions count from its own
    tokens, so each row computes what it would with its prompt alone. A step that finds the
    prompts in the KV cache only widens the mask and shifts positions.
    """
    if args:  # model(input_ids, ...) called positionally
        kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise AdapterError("prompt tuning cannot run on packed batches (a 4-D attention mask): each packed example "
                           "would need its own virtual tokens; set data.packing: false")
    embeds, input_ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
    batch, length = (embeds if embeds is not None else input_ids).shape[:2]
    prompts = prompts_of(batch)
    cached = cached_length(kwargs.get("cache", kwargs.get("past_key_values")))
    run.pending_length = None
    if cached == 0:
        run.front = max((p.shape[0] for p in prompts if p is not None), default=0)
    if run.front == 0:  # no virtual tokens here or in the cache: the plain model
        return args, kwargs
    device = (embeds if embeds is not None else input_ids).device
    lengths = torch.tensor([0 if p is None else p.shape[0] for p in prompts], device=device)  # (B,)
    if cached == 0:
        kwargs.pop("inputs_embeds", None), kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
        kwargs["inputs_embeds"] = torch.cat([_front_embeddings(prompts, run.front, embeds), embeds], dim=1)
        run.pending_length = length
    _widen(model, kwargs, lengths, run.front, cached, length)
    return args, kwargs


def _front_embeddings(prompts: Sequence[torch.Tensor | None], front: int, embeds: torch.Tensor) -> torch.Tensor:
    """(B, front, d): each row's virtual tokens at the right end of the front, zeros (masked out) before them."""
    rows = []
    for prompt in prompts:
        pad = embeds.new_zeros(front - (0 if prompt is None else prompt.shape[0]), embeds.shape[-1])
        rows.append(pad if prompt is None else torch.cat([pad, prompt.to(embeds.dtype)]))
    return torch.stack(rows)


def _widen(model: nn.Module, kwargs: dict, lengths: torch.Tensor, front: int, cached: int, length: int) -> None:
    """Make mask, positions and labels cover the `front` virtual positions (or, with a cache, shift past them).

    Row r's last lengths[r] front positions are its virtual tokens (positions 0..n_r-1) and the rest
    are masked out; its own positions move up by n_r. Rows whose fronts differ need a mask and, where
    the model takes them, position ids: made here when the caller gave none.
    """
    first, batch = cached == 0, lengths.shape[0]
    past = 0 if first else cached - front  # the caller's own cached positions
    skip = front - lengths  # (B,) masked-out front positions per row
    ragged = bool((skip > 0).any())
    slots = torch.arange(front, device=lengths.device)
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is None and ragged:
        mask = torch.ones(batch, past + length, dtype=torch.long, device=lengths.device)
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([(slots >= skip[:, None]).to(mask.dtype), mask], dim=1)  # (B, front + .)
    if positions is None and ragged and "position_ids" in inspect.signature(model.forward).parameters:
        positions = (past + torch.arange(length, device=lengths.device)).expand(batch, length)
    if positions is not None:
        shifted = positions + lengths[:, None].to(positions.device)
        kwargs["position_ids"] = shifted if not first else torch.cat(
            [(slots - skip[:, None]).clamp(min=0).to(positions.device), shifted], dim=1)
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        kwargs["cache_position"] = (cache_position + front if not first else
                                    torch.arange(front + cache_position.shape[0], device=cache_position.device))
    labels = kwargs.get("labels")
    if labels is not None and first:
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], front), IGNORE_INDEX), labels], dim=1)


def _strip_prompt_logits(model: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: keep only the logits of the caller's own T positions."""
    return strip_virtual(getattr(model, CHILD).run, output)


def strip_virtual(run: PromptRun, output: Any) -> Any:
    """The forward hook's work: cut the virtual positions off the logits of the forward `run` prompted."""
    length, run.pending_length = run.pending_length, None
    logits = getattr(output, "logits", None)
    if length is None or logits is None:
        if length is not None:
            raise AdapterError("prompt tuning needs the model's output as an object with .logits (return_dict=True)")
        return output
    if logits.shape[1] > length:
        output.logits = logits[:, -length:]  # (B, T, V): the virtual positions are cut off
    return output


def peft_config(cfg: PromptTuning, model: nn.Module, token_dim: int, base_name: str | None) -> dict:
    """peft's PromptTuningConfig fields for this adapter."""
    model_cfg = getattr(model, "config", None)
    get = lambda *names: next((getattr(model_cfg, a) for a in names if getattr(model_cfg, a, None)), None)  # noqa: E731
    return {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_name or get("_name_or_path"), "revision": None, "inference_mode": True,
        "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": get("num_attention_heads", "n_head"), "num_layers": get("num_hidden_layers", "n_layer"),
        "prompt_tuning_init": cfg.init_from.upper(), "prompt_tuning_init_text": cfg.init_text,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path, "tokenizer_kwargs": None, "modules_to_save": None,
    }


def read_folder(base_model: nn.Module, folder: Path, raw: dict) -> tuple[PromptTuning, torch.Tensor]:
    """The config and the (n, d) virtual-token table of a peft PROMPT_TUNING folder, checked against `base_model`."""
    source = folder / "adapter_config.json"
    if raw.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{source}: num_transformer_submodules is {raw['num_transformer_submodules']}; lorakit "
                           "prompt tuning serves decoder-only models (1)")
    weights_path = folder / "adapter_model.safetensors"
    try:
        embeddings = load_file(str(weights_path))[PEFT_KEY]
    except KeyError as error:
        raise AdapterError(f"{weights_path} has no {PEFT_KEY!r} tensor") from error
    except Exception as error:  # missing, corrupt or truncated file
        raise AdapterError(f"cannot read {weights_path}: {error}") from error
    d = base_model.get_input_embeddings().weight.shape[1]
    n = raw.get("num_virtual_tokens")
    if tuple(embeddings.shape) != (n, d):
        raise AdapterError(f"{weights_path}: {PEFT_KEY} is {tuple(embeddings.shape)}, but num_virtual_tokens={n} "
                           f"and the base model's embedding size {d} need {(n, d)}")
    try:
        cfg = PromptTuning(num_virtual_tokens=n, init_text=raw.get("prompt_tuning_init_text"),
                           tokenizer_name_or_path=raw.get("tokenizer_name_or_path"))
    except ConfigError as error:
        raise AdapterError(f"{source}: {error}") from error
    return cfg, embeddings
