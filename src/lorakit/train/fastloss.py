"""Cross-entropy without full-vocabulary logits: the backbone's hidden states, projected in chunks.

The plain path runs the whole causal LM and takes the loss of its logits, a (B, T, V) tensor
plus its fp32 copy: for a 49k vocabulary and 2k tokens that is 0.4 GB per copy, written and
read again in backward, and usually the largest tensor of the step. Here the training step
calls the model's backbone (hidden states (B, T, C)), keeps only the positions that have a
target (labels != -100; prompt and padding positions need no logits at all), and computes
logits, log-softmax and the loss `chunk_rows` positions at a time. Backward recomputes each
chunk's logits instead of storing them:

    loss = sum_i  logsumexp(z_i) - z_i[y_i],   z_i = W h_i
    dL/dz_i = softmax(z_i) - onehot(y_i),      dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T

Only models whose logits are exactly `lm_head(last_hidden_state)` qualify (see `LM_HEADS`);
anything else (a softcapped or scaled head, an adapted or quantised head, an unknown model
type, hooks on the model's own forward, which calling the backbone would skip) falls back to the
plain path, which stays the reference the tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.labels import IGNORE_INDEX

CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MiB in fp32), whatever the vocabulary

# model_type -> attribute holding the backbone; these compute logits = lm_head(hidden) and nothing more
LM_HEADS: dict[str, str] = {
    "llama": "model", "mistral": "model", "qwen2": "model", "qwen3": "model", "smollm3": "model",
    "olmo2": "model", "gpt2": "transformer",
}


@dataclass
class HeadSplit:
    """A causal LM seen as backbone -> hidden states and a plain linear head."""

    backbone: nn.Module
    head: nn.Linear


def forward_is_hooked(model: nn.Module) -> bool:
    """True when hooks sit on the model's own forward (e.g. prompt tuning's): a fast path that calls the
    model's parts, or changes how it attends, would skip or contradict them."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile, the hooks are on the original module
    return bool(model._forward_pre_hooks or model._forward_hooks)


def split_head(model: nn.Module) -> HeadSplit | None:
    """The backbone and the linear head of `model`, or None when the chunked loss cannot stand in."""
    if forward_is_hooked(model):
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    backbone = getattr(model, LM_HEADS.get(model_type, ""), None) if model_type in LM_HEADS else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if backbone is None or type(head) is not nn.Linear or head.bias is not None:
        return None
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return HeadSplit(backbone=backbone, head=head)


def chunk_rows(vocab: int) -> int:
    """Positions per chunk so one chunk holds about CHUNK_ELEMENTS logits."""
    return max(1, CHUNK_ELEMENTS // vocab)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk (no -100 here)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, rows: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        ctx.compute_dtype, ctx.rows = compute_dtype, rows
        w = weight.to(compute_dtype)  # (V, C)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            logits = (hidden[start:start + rows].to(compute_dtype) @ w.T).float()  # (n, V)
            total += F.cross_entropy(logits, targets[start:start + rows], reduction="sum")
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        dtype, rows = ctx.compute_dtype, ctx.rows
        w = weight.to(dtype)  # (V, C)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(dtype)  # (n, C)
            probs = torch.softmax((h @ w.T).float(), dim=-1)  # (n, V)
            probs[torch.arange(h.shape[0], device=h.device), targets[start:start + rows]] -= 1.0
            grad_logits = (probs * grad_total).to(dtype)  # dL/dz, (n, V)
            if grad_hidden is not None:
                grad_hidden[start:start + rows] = grad_logits @ w  # (n, C)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()  # (V, C)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_loss_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                     rows: int | None = None) -> torch.Tensor:
    """Summed token cross-entropy of head(hidden) against shifted `labels`, without full logits.

    hidden (B, T, C), labels (B, T) with -100 where untrained. The matmul runs in the autocast
    dtype when autocast is on (as the plain head would), else in the hidden states' dtype;
    log-softmax and the sum are fp32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
    flat_labels = labels.reshape(-1)  # (B*T,)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)  # (N,) positions with a target
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (N, C)
    targets = flat_labels.index_select(0, keep)  # (N,)
    rows = rows or chunk_rows(head.weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _ChunkedCrossEntropy.apply(picked, head.weight, targets, dtype, rows)
