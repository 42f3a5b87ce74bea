"""Variable-length attention for packed rows: each packed example attends in its own causal block, no dense mask.

Packed batches (data/batching.py) carry restarted position_ids and a dense (B, 1, T, T) block-diagonal
float mask. With the mask, SDPA computes every row's full T x T scores and then throws most of
them away. This module computes only each example's own causal block:

- `enabled(model)` (entered by `train.setup.prepared` for the run) switches a model whose attention
  goes through transformers' AttentionInterface from "sdpa" to the implementation "lorakit_varlen",
  after a probe confirms it gives the dense path's logits on a packed row; on exit the original
  implementation is restored. Anything else (eager or flash models, BLOOM, forward hooks such as
  prompt tuning's, a model the probe fails on) is left as it is: the dense mask path.
- `varlen_inputs(batch)` (called per micro-batch by `train.step.ModelLoss.with_boundaries`) checks
  that a batch's 4-D mask is exactly the block-causal mask its position_ids imply (examples start
  where positions restart) and only then adds the example boundaries as transformers' flash-attention
  varlen kwarg `cu_seq_lens_q` / `cu_seq_lens_k` (int32 offsets into the flattened B*T tokens). The
  mask stays in the batch.
- `varlen_attention_forward` runs causal attention per example when those kwargs arrive; without
  them, or when anything beyond plain causal attention is asked (sliding window, softcap, sinks,
  a position bias, attention weights, a KV cache), it runs transformers' own SDPA path with the
  mask as given. So the fallback is the dense path itself, and a batch is never run without
  either its mask or its boundaries.

CPU: one SDPA call (is_causal) per example, in fp32 with autocast off, and each run of one-token
examples (lorakit's padding tokens) is a copy of its values. fp32 because torch's CPU flash
attention backward in bf16 has a large cost per query token whatever the length (figures in
benchmarks/RESULTS.md, "Measured in passing"). Under bf16 autocast the result is cast back to bf16; it is at least as
accurate as the bf16 dense path. CUDA (bf16/fp16): one `torch.nn.attention.varlen.varlen_attn`
call (flash varlen) for the whole batch. Under torch.compile the attention call is left out of
the graph (`torch.compiler.disable`): its loop depends on the data.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lorakit.data.batching import block_causal_mask
from lorakit.data.packing import probe_inputs
from lorakit.train.fastloss import forward_is_hooked

IMPLEMENTATION = "lorakit_varlen"
ENABLED = True  # process-wide switch: False keeps every model on the dense mask path (benchmarks compare both)
CU_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
# attention kwargs under which the per-example path is not plain causal attention: fall back to SDPA
_NOT_PLAIN = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "head_mask")

calls = {"varlen": 0}  # attention calls that took the per-example path (for tests and the probe)


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions -> (B, T) bool: True where an example starts (row start, or positions not +1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def varlen_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` plus cu_seq_lens_q/k when its 4-D mask is exactly its position_ids' block-causal mask.

    Any other batch (padded, no position_ids, a mask of another shape or content) is returned unchanged.
    """
    mask, positions = batch.get("attention_mask"), batch.get("position_ids")
    if mask is None or positions is None or mask.ndim != 4 or positions.ndim != 2 or mask.shape[1] != 1:
        return batch
    rows, width = positions.shape
    if mask.shape != (rows, 1, width, width) or not mask.is_floating_point():
        return batch
    starts = segment_starts(positions)
    expected = block_causal_mask(starts.cumsum(dim=1).to(mask.device))  # (B, 1, T, T) float32
    if not torch.equal(mask, expected.to(mask.dtype)):
        return batch
    flat = torch.nonzero(starts.reshape(-1)).reshape(-1)  # example starts in the flattened B*T tokens
    cu = torch.cat([flat, flat.new_tensor([rows * width])]).to(device=positions.device, dtype=torch.int32)
    return {**batch, CU_KEYS[0]: cu, CU_KEYS[1]: cu}


def strip_varlen_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` without the keys `varlen_inputs` adds."""
    return {key: value for key, value in batch.items() if key not in CU_KEYS}


def _plain(module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """True when the call asks for plain causal self-attention that the boundaries fully describe."""
    if kwargs.get(CU_KEYS[1]) is not kwargs.get(CU_KEYS[0]) or kwargs.get("output_attentions"):
        return False
    if any(kwargs.get(name) is not None for name in _NOT_PLAIN):
        return False
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is not True:
        return False
    return query.shape[2] == key.shape[2] and query.shape[0] == key.shape[0]  # no cache, no cross-attention


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: per-example causal attention given cu_seq_lens, else SDPA.

    query (B, H, T, D), key/value (B, KV, T, D); returns ((B, T, H, D), None) like transformers' SDPA.
    """
    cu = kwargs.get(CU_KEYS[0])
    if cu is not None and _plain(module, query, key, kwargs):
        out = _per_example(query, key, value, cu, dropout, scaling)
        if out is not None:
            return out, None
    kwargs = {k: v for k, v in kwargs.items() if k not in CU_KEYS}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_last_plan: list[Any] = [None, None]  # (cu tensor, its runs): every layer of one forward gets the same tensor
_last_longest: list[Any] = [None, None]  # (cu tensor, its longest example), for the CUDA path


def _runs(cu: torch.Tensor) -> list[tuple[int, bool]]:
    """Example lengths from the offsets, with consecutive one-token examples merged: [(tokens, single), ...]."""
    if _last_plan[0] is cu:
        return _last_plan[1]
    runs: list[list] = []
    for n in cu.diff().tolist():
        if n == 1 and runs and runs[-1][1]:
            runs[-1][0] += 1
        else:
            runs.append([n, n == 1])
    plan = [(n, single) for n, single in runs]
    _last_plan[:] = [cu, plan]
    return plan


@torch.compiler.disable
def _per_example(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                 dropout: float, scaling: float | None) -> torch.Tensor | None:
    """(B, T, H, D) attention output, each example causal within itself; None if `cu` does not fit."""
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        return None
    q, k, v = (x.transpose(1, 2).reshape(rows * width, x.shape[1], dim) for x in (query, key, value))  # (N, h, D)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout:
        return _flash_varlen(q, k, v, cu, scaling, kv_heads != heads).view(rows, width, heads, dim)
    runs = _runs(cu)
    if sum(n for n, _ in runs) != rows * width:
        return None
    calls["varlen"] += 1
    dtype, groups = query.dtype, heads // kv_heads
    with torch.autocast(query.device.type, enabled=False):
        if query.device.type == "cpu":
            q, k, v = q.float(), k.float(), v.float()
        sizes = [n for n, _ in runs]
        outs = []
        for (n, single), q_part, k_part, v_part in zip(runs, q.split(sizes), k.split(sizes), v.split(sizes)):
            if single:  # one-token examples attend to themselves only: weight 1 (or dropped)
                own = v_part.repeat_interleave(groups, dim=1) if groups > 1 else v_part  # (n, H, D)
                if dropout:
                    own = own * (torch.rand(n, heads, 1, device=own.device) >= dropout) / (1 - dropout)
                outs.append(own)
                continue
            attended = F.scaled_dot_product_attention(  # (1, H, n, D)
                q_part.transpose(0, 1)[None], k_part.transpose(0, 1)[None], v_part.transpose(0, 1)[None],
                dropout_p=dropout, is_causal=n > 1, scale=scaling, enable_gqa=groups > 1)
            outs.append(attended[0].transpose(0, 1))
        return torch.cat(outs).to(dtype).view(rows, width, heads, dim)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scaling: float | None,
                  gqa: bool) -> torch.Tensor:
    """One flash-attention varlen call for all examples (CUDA); (N, H, D)."""
    from torch.nn.attention.varlen import varlen_attn  # newer than the torch>=2.4 lorakit allows: imported on use

    if _last_longest[0] is not cu:
        _last_longest[:] = [cu, int(cu.diff().max())]  # one device sync per forward, not per layer
    longest = _last_longest[1]
    calls["varlen"] += 1
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest,
                       scale=scaling, enable_gqa=gqa)


def register() -> None:
    """Register "lorakit_varlen" with transformers (idempotent); masks are built as for "sdpa"."""
    AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _probe(model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> bool:
    """True when a packed two-example row gives the dense path's logits with the boundaries passed."""
    parameter = next(model.parameters())
    packed, _, _ = probe_inputs(model.get_input_embeddings().num_embeddings, parameter.device)
    with_cu = varlen_inputs(packed)
    if CU_KEYS[0] not in with_cu:
        return False
    was_training, before = model.training, calls["varlen"]
    model.eval()
    try:
        with torch.no_grad(), autocast():
            reduced = torch.is_autocast_enabled(parameter.device.type)
            dense = model(**packed, use_cache=False).logits.float()
            varlen = model(**with_cu, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    tolerance = 1e-4 if parameter.dtype == torch.float32 and not reduced else 2e-2
    scale = max(1.0, dense.abs().max().item())
    return calls["varlen"] > before and (dense - varlen).abs().max().item() <= tolerance * scale


@contextlib.contextmanager
def enabled(model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
            ) -> Iterator[bool]:
    """Switch `model` to "lorakit_varlen" while inside, if it applies (yields whether it did); restore after."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if (not ENABLED or original != "sdpa" or forward_is_hooked(model)
            or not getattr(model, "_supports_attention_backend", False) or not hasattr(model, "get_input_embeddings")):
        yield False
        return
    register()
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        applies = config._attn_implementation == IMPLEMENTATION and _probe(model, autocast)
    except Exception:  # a model that cannot switch, or fails on the probe: the dense path
        applies = False
    if not applies:
        model.set_attn_implementation(original)
        yield False
        return
    try:
        yield True
    finally:
        model.set_attn_implementation(original)


def is_enabled(model: nn.Module) -> bool:
    """True when `model` (or the model inside a compiled or DDP wrapper) runs "lorakit_varlen" now."""
    for attribute in ("_orig_mod", "module"):
        model = getattr(model, attribute, model)
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == IMPLEMENTATION
