"""A decoder's sizes as the memory model needs them, read from a config.

`shape_from_config(cfg)` turns a Hugging Face config (a dict or a PretrainedConfig) into a
`ModelShape`: hidden size, layers, heads, MLP width and whether the MLP is gated, which set the
activations autograd saves per token (analysis/memory.py). One small reader per architecture
family, looked up by `model_type`. Parameter counts do not come from here: they come from the
methods themselves, applied to the model's meta skeleton (analysis/params.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """The per-token sizes of one decoder-only model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool  # SwiGLU-style gate * up (3 MLP matrices) rather than 2


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is None:
        raise ConfigError(f"model config has none of {', '.join(names)}")
    return default


def _llama(cfg: Mapping[str, Any]) -> ModelShape:
    """Llama, Mistral, Qwen2, SmolLM: grouped-query attention, SwiGLU MLP."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    return ModelShape(cfg.get("model_type", "llama"), cfg["vocab_size"], h, cfg["num_hidden_layers"], heads, kv,
                      hd, cfg["intermediate_size"], True)


def _bloom(cfg: Mapping[str, Any]) -> ModelShape:
    """BLOOM: multi-head attention, a 4h GELU MLP."""
    h = _get(cfg, "hidden_size", "n_embed")
    heads = _get(cfg, "n_head", "num_attention_heads")
    return ModelShape("bloom", cfg["vocab_size"], h, _get(cfg, "n_layer", "num_hidden_layers"), heads, heads,
                      h // heads, 4 * h, False)


def _gpt2(cfg: Mapping[str, Any]) -> ModelShape:
    """GPT-2: multi-head attention, an n_inner (default 4h) GELU MLP."""
    h, heads = cfg["n_embd"], cfg["n_head"]
    return ModelShape("gpt2", cfg["vocab_size"], h, cfg["n_layer"], heads, heads, h // heads,
                      cfg.get("n_inner") or 4 * h, False)


# model_type -> reader; Llama-shaped families share one
SHAPE_READERS: dict[str, Callable[[Mapping[str, Any]], ModelShape]] = {
    "llama": _llama, "mistral": _llama, "qwen2": _llama, "bloom": _bloom, "gpt2": _gpt2,
}


def shape_from_config(cfg: Any) -> ModelShape:
    """The ModelShape of a Hugging Face config (dict or PretrainedConfig)."""
    values = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
    model_type = values.get("model_type")
    if model_type not in SHAPE_READERS:
        raise ConfigError(f"the memory estimate knows no architecture {model_type!r}; supported model types: "
                          f"{', '.join(SHAPE_READERS)}")
    return SHAPE_READERS[model_type](values)
