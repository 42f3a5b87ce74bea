"""Packed rows on a model: the leak probe (`packing_problem`, `check_packing`) and BLOOM's ALiBi per example.

(Packing itself, best-fit rows and the block-diagonal causal mask, is layout: data/batching.py, with both
layouts: `make_batches(pack=True)` packs the epoch, `pack_each_batch` (data.packing auto) lays each unpacked
micro-batch out as packed rows, so a run packs without changing which examples make a step.)

Why a mask: restarted position_ids alone do not isolate packed examples. transformers 5.x
derives a packed mask from position_ids only when no attention_mask and no cache is passed;
with the default use_cache=True a cache is created and examples attend to each other
(measured on Llama, Qwen2 and GPT-2 on CPU, sdpa and eager). A 4D block-diagonal causal mask
is honoured as given:
transformers' masking_utils returns any 4D attention_mask unchanged, sdpa uses it as an
additive float mask, and eager attention adds it to the scores. So the mask is float
(0 = attend, dtype-min = blocked), never bool: eager would add a bool mask as 0/1 and leak.

Supported: architectures whose attention takes a 4D mask and whose positions come from
position_ids or are relative (rotary): checked on Llama, Qwen2 and GPT-2 by the parity tests.
BLOOM too, inside `packed_forward(model)`: BLOOM has no position_ids (BloomForCausalLM drops
them) but adds an ALiBi bias, slope * key position (Press et al. 2022, "Train Short, Test
Long"), which BloomModel builds from a 2D padding mask and cannot build from a 4D one. While
inside, each BloomModel's `build_alibi_tensor` takes a square 4D mask and gives every key its
position within its own example: the number of keys the key's own mask row allows, minus one.
For lorakit's block-causal mask that is exactly the restarted position_ids, and the bias
values are the ones the example gets when run alone (not merely equal after softmax's shift
invariance: in bf16 a bias built from row positions would round differently). The mask itself
goes to attention unchanged; 2D masks and no mask (generation, KV cache) take BLOOM's own path.
`check_packing` probes any model, through `packed_forward`, and raises instead of letting
examples leak, so a transformers version that builds BLOOM's bias differently is refused.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lorakit.data.batching import collate_packed
from lorakit.errors import DataError

ALIBI_BUILDER = "build_alibi_tensor"  # BloomModel's method: (2D mask, num_heads, dtype) -> (B*H, 1, T) bias


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) attention mask (float 0 = attend, or bool True = attend) -> (B, T) positions.

    A token's own mask row allows the keys from its example's start up to itself, so their
    count minus one is its position within its example: the restarted position_ids for a
    block-causal mask (padding's one-token blocks get 0).
    """
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # (B, T, T)
    return allowed.sum(dim=-1) - 1


def example_alibi(mask: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) mask, (H,) slopes -> (B*H, 1, T) ALiBi bias: slope * key position within its example.

    The layout and the fp32 product are BLOOM's own (`build_alibi_tensor`), so a packed example
    gets the bias values it gets when run alone.
    """
    positions = mask_positions(mask)  # (B, T)
    bias = slopes.float()[None, :, None] * positions[:, None, :]  # (B, H, T)
    return bias.reshape(-1, 1, positions.shape[1]).to(dtype)


def _alibi_builder(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """BloomModel's `build_alibi_tensor`, extended to square 4D masks; anything else goes to `original`."""

    def build_alibi_tensor(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        if attention_mask.ndim != 4 or attention_mask.shape[-1] != attention_mask.shape[-2]:
            return original(attention_mask, num_heads, dtype)
        unit = torch.ones(1, 2, device=attention_mask.device)  # positions 0, 1: the bias at 1 is the slope
        slopes = original(unit, num_heads, torch.float32).reshape(num_heads, 2)[:, 1]  # (H,)
        return example_alibi(attention_mask, slopes, dtype)

    return build_alibi_tensor


def _alibi_backbones(model: nn.Module) -> list[nn.Module]:
    """The BloomModels inside `model` (they build the ALiBi bias)."""
    return [module for module in model.modules()
            if getattr(getattr(module, "config", None), "model_type", None) == "bloom"
            and callable(getattr(module, ALIBI_BUILDER, None))]


@contextlib.contextmanager
def packed_forward(model: nn.Module) -> Iterator[str]:
    """While inside, `model` can run packed batches; yields what was changed for it ("" for nothing).

    Only BLOOM needs a change (see the module docstring): each BloomModel inside `model` gets an
    instance `build_alibi_tensor` that also takes the 4D mask; it is removed again on exit.
    Padded and unmasked forwards (evaluation, generation with a KV cache) are not affected.
    """
    backbones = _alibi_backbones(model) if isinstance(model, nn.Module) else []
    saved = [module.__dict__.get(ALIBI_BUILDER) for module in backbones]  # an outer packed_forward's
    for module in backbones:
        setattr(module, ALIBI_BUILDER, _alibi_builder(getattr(module, ALIBI_BUILDER)))
    try:
        yield (f"ALiBi bias built per example by lorakit on transformers {version('transformers')}"
               if backbones else "")
    finally:
        for module, before in zip(backbones, saved):
            if before is None:
                delattr(module, ALIBI_BUILDER)
            else:
                setattr(module, ALIBI_BUILDER, before)


def probe_inputs(vocab_size: int, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, slice]:
    """(one packed row of two random examples, the second example alone, its slice in the row): what
    the leak probe here and the per-example attention probe (train/varlen.py) compare."""
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in (5, 6))
    row = [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}]
    packed = collate_packed([row], pad_id=0)
    packed.pop("labels")
    packed = {k: v.to(device) for k, v in packed.items()}
    alone = torch.tensor([second], device=device)
    return packed, alone, slice(len(first), len(first) + len(second))


def sliding_window(config: Any) -> int | None:
    """The sliding-window length some attention layers of the model use, or None."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def check_packing(model: Any, max_length: int | None = None, tolerance: float | None = None) -> None:
    """Raise DataError unless packed batches are leak-free on `model` (inside `packed_forward`).

    The probe is `packing_problem`'s; the error is its reason and what to set instead.
    """
    found = packing_problem(model, max_length, tolerance)
    if found is not None:
        raise DataError(f"{found.reason}; {found.remedy}") from found.error


@dataclass(frozen=True)
class PackingProblem:
    """Why packed rows are not exact on a model, what to set instead, and what the model raised (if it did)."""

    reason: str
    remedy: str = "set data.packing: false"
    error: Exception | None = None


def packing_problem(model: Any, max_length: int | None = None, tolerance: float | None = None
                    ) -> PackingProblem | None:
    """Why packed rows are not exact on `model` (reason, remedy), or None when the leak probe passes.

    Runs one packed row of two random examples and compares the second example's logits with
    the same example run alone; any difference beyond rounding means attention or positions
    crossed the example boundary. Cheap: 11 tokens, no gradient; the model's mode is kept.
    A packed row's mask is block-causal and cannot also carry a sliding window, so a model with
    a window shorter than the rows (`max_length`; unknown: the model's longest) is refused.
    """
    model_type = getattr(model.config, "model_type", "unknown")
    window = sliding_window(model.config)
    longest = max_length or getattr(model.config, "max_position_embeddings", None)
    if window is not None and (longest is None or longest > window):
        return PackingProblem(f"packing is not exact for model type {model_type!r}: it uses sliding-window "
                              f"attention (window {window}) shorter than data.max_length ({longest}), which a packed "
                              "row's mask cannot express", f"set data.max_length <= {window} or data.packing: false")
    parameter = next(model.parameters())
    packed, alone, second = probe_inputs(model.get_input_embeddings().num_embeddings, parameter.device)
    was_training = model.training
    model.eval()
    with packed_forward(model) as changed:
        how = f"; {changed}" if changed else ""
        try:
            with torch.no_grad():
                packed_logits = model(**packed).logits[0, second].float()  # (n, V)
                alone_logits = model(input_ids=alone).logits[0].float()  # (n, V)
        except Exception as error:
            return PackingProblem(f"packing is not supported for model type {model_type!r}{how}: the model failed "
                                  f"on a packed batch ({type(error).__name__}: {error})", error=error)
        finally:
            model.train(was_training)
    if tolerance is None:
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 2e-2
    scale = max(1.0, alone_logits.abs().max().item())
    difference = (packed_logits - alone_logits).abs().max().item()
    if difference > tolerance * scale:
        return PackingProblem(f"packing is not leak-free for model type {model_type!r} (attention implementation "
                              f"{getattr(model.config, '_attn_implementation', '?')!r}{how}): a packed example's "
                              f"logits differ by {difference:.3g} from the example run alone")
    return None
