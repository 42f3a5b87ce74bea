"""Packing: bin-pack examples into rows, and keep packed examples from attending to each other.

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
Not supported: BLOOM (ALiBi bias built from a 2D mask; a 4D mask crashes). `check_packing`
probes any model and raises instead of letting examples leak.
"""
from __future__ import annotations

import bisect
from typing import Any

import torch

from lorakit.errors import DataError

# model_type -> why packed batches cannot be made leak-free for it
UNSUPPORTED = {
    "bloom": "BLOOM builds its ALiBi bias from a 2D padding mask and cannot take a 4D "
             "block-diagonal attention mask",
}


def pack_lengths(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit packing: indices of `lengths` grouped into rows of total length <= max_length.

    Examples are placed in the given order, each into the open row with the least space that
    still fits it (or a new row). Deterministic; O(n log n) apart from list inserts.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for j, n in enumerate(lengths):
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            rows.append([])
            space, r = max_length, len(rows) - 1
        rows[r].append(j)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive float mask: 0 where t may attend to s.

    t attends to s when both belong to the same segment and s <= t.
    """
    width = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    blocked = ~(same & causal)
    mask = torch.zeros(blocked.shape, dtype=torch.float32)
    return mask.masked_fill(blocked, torch.finfo(torch.float32).min)[:, None]  # (B, 1, T, T)


def _probe_inputs(vocab_size: int, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, slice]:
    from lorakit.data.batching import collate_packed  # batching imports this module

    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in (5, 6))
    row = [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}]
    packed = collate_packed([row], pad_id=0)
    packed.pop("labels")
    packed = {k: v.to(device) for k, v in packed.items()}
    alone = torch.tensor([second], device=device)
    return packed, alone, slice(len(first), len(first) + len(second))


def check_packing(model: Any, tolerance: float | None = None) -> None:
    """Raise DataError unless packed batches are leak-free on `model`.

    Runs one packed row of two random examples and compares the second example's logits with
    the same example run alone; any difference beyond rounding means attention or positions
    crossed the example boundary. Cheap: 11 tokens, no gradient; the model's mode is kept.
    """
    model_type = getattr(model.config, "model_type", "unknown")
    if model_type in UNSUPPORTED:
        raise DataError(f"packing is not supported for model type {model_type!r}: "
                        f"{UNSUPPORTED[model_type]}; set data.packing: false")
    parameter = next(model.parameters())
    packed, alone, second = _probe_inputs(model.get_input_embeddings().num_embeddings, parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed_logits = model(**packed).logits[0, second].float()  # (n, V)
            alone_logits = model(input_ids=alone).logits[0].float()  # (n, V)
    except Exception as error:
        raise DataError(f"packing is not supported for model type {model_type!r}: the model failed on a "
                        f"packed batch ({type(error).__name__}: {error}); set data.packing: false") from error
    finally:
        model.train(was_training)
    if tolerance is None:
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 2e-2
    scale = max(1.0, alone_logits.abs().max().item())
    difference = (packed_logits - alone_logits).abs().max().item()
    if difference > tolerance * scale:
        raise DataError(f"packing is not leak-free for model type {model_type!r} (attention "
                        f"implementation {getattr(model.config, '_attn_implementation', '?')!r}): a packed "
                        f"example's logits differ by {difference:.3g} from the example run alone; "
                        "set data.packing: false")
