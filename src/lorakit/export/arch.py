"""Which Hugging Face architectures export to GGUF, and how their tensors become llama.cpp's.

One entry per architecture in `ARCHITECTURES` (the transformers class name -> `GGUFArch`); a model of any
other class is refused by `architecture_of` with one line that names it and the supported list.

Llama-family Q/K rows: transformers applies rotary embeddings to the two halves of each head
(`rotate_half`: dimension i pairs with i + head_dim/2), llama.cpp's LLAMA graph to neighbouring pairs
(2i with 2i + 1). `permute_qk` reorders each head's rows of q_proj/k_proj (weights, biases, LoRA B) so
that llama.cpp's pairs hold the values transformers pairs: head rows [h0 ... h_{d/2-1}, h_{d/2} ... h_{d-1}]
become [h0, h_{d/2}, h1, h_{d/2+1}, ...]. Attention scores q.k are unchanged by a permutation applied to
both q and k, so only rotary embedding sees the new order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lorakit.errors import LorakitError


class UnsupportedArchitecture(LorakitError):
    """A model class GGUF export has no mapping for."""


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture is written as GGUF."""

    hf_class: str  # e.g. "LlamaForCausalLM"
    gguf_arch: str  # llama.cpp's architecture name, general.architecture ("llama")
    rope_permute: bool  # reorder q_proj/k_proj rows from halves to pairs (module docstring)
    rope_types: tuple[str, ...]  # transformers rope_type values whose frequencies a rope_freqs tensor expresses


LLAMA = GGUFArch("LlamaForCausalLM", "llama", rope_permute=True, rope_types=("default", "linear", "llama3"))
ARCHITECTURES: dict[str, GGUFArch] = {arch.hf_class: arch for arch in (LLAMA,)}


def supported_architectures() -> list[str]:
    """The transformers class names that export, sorted."""
    return sorted(ARCHITECTURES)


def architecture_of(class_name: str) -> GGUFArch:
    """The GGUFArch for a model class, or one line naming the class and the supported ones."""
    if class_name not in ARCHITECTURES:
        raise UnsupportedArchitecture(f"GGUF export does not support the {class_name} architecture; supported: "
                                      f"{', '.join(supported_architectures())}")
    return ARCHITECTURES[class_name]


def permute_qk(rows: Any, heads: int) -> Any:
    """Rows of a q_proj/k_proj weight (out, in), bias (out,) or LoRA B (out, r), per head from transformers'
    halves order to llama.cpp's pairs order. `heads`: query heads for q_proj, key/value heads for k_proj."""
    out = rows.shape[0]
    if out % (2 * heads):
        raise ValueError(f"{out} rows do not split into {heads} heads of an even size")
    # (heads, 2 halves, head_dim/2, ...) -> (heads, head_dim/2, 2, ...): element j of half 0 then of half 1
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_qk(rows: Any, heads: int) -> Any:
    """The inverse of `permute_qk`: llama.cpp's pairs order back to transformers' halves order."""
    out = rows.shape[0]
    return rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_heads(name: str, config: Any) -> int | None:
    """The head count a q_proj/k_proj tensor (weight, bias or LoRA B) is permuted with; None for other tensors."""
    if ".q_proj." in name:
        return int(config.num_attention_heads)
    if ".k_proj." in name:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def rope_frequency_factors(model: Any, arch: GGUFArch) -> np.ndarray | None:
    """llama.cpp's rope_freqs tensor: default frequency / the model's, per rotary pair (llama.cpp divides each
    default frequency by it); None when they are the defaults. Refuses rope types a constant factor cannot express."""
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in arch.rope_types:
        raise UnsupportedArchitecture(f"GGUF export of {arch.hf_class} does not support rope_type {rope_type!r}; "
                                      f"supported: {', '.join(arch.rope_types)}")
    rotary = model.get_decoder().rotary_emb
    if float(rotary.attention_scaling) != 1.0:
        raise UnsupportedArchitecture(f"GGUF export does not support rope attention scaling "
                                      f"{rotary.attention_scaling} (rope_type {rope_type!r})")
    default, _ = type(rotary).compute_default_rope_parameters(config)
    factors = (default.double() / rotary.original_inv_freq.double()).float().numpy()
    return None if np.all(factors == 1.0) else factors
