"""A decoder-only model as numbers: its linear layers, norms and embeddings, read from a config.

`shape_from_config(cfg)` turns a Hugging Face config (a dict or a PretrainedConfig) into a
`ModelShape`; one small reader per architecture family, looked up by `model_type`. Everything
the calculator counts comes from here, so presets (public config numbers) and real configs
(AutoConfig, no weights) go through the same path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block."""

    name: str  # leaf module name as in the Hugging Face model, e.g. "q_proj"
    d_in: int
    d_out: int
    bias: bool
    block: str  # "attention" or "mlp"


@dataclass(frozen=True)
class ModelShape:
    """Everything the parameter and memory formulas need about one model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    linears: tuple[Linear, ...]  # per decoder layer
    norm_params_per_layer: int  # weights (+ biases) of the norms inside one layer
    other_norm_params: int  # final norm, embedding norm
    position_embeddings: int  # learned absolute positions (GPT-2), else 0
    tied_embeddings: bool
    gated_mlp: bool  # SwiGLU-style gate * up (3 MLP matrices) rather than 2

    @property
    def embedding_params(self) -> int:
        """Token embedding (+ learned positions)."""
        return self.vocab_size * self.hidden_size + self.position_embeddings

    @property
    def head_params(self) -> int:
        """The output projection, 0 when it shares the embedding matrix."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """Weights and biases of one layer's linear layers."""
        return sum(l.d_in * l.d_out + (l.d_out if l.bias else 0) for l in self.linears)

    @property
    def total_params(self) -> int:
        """Every parameter, a tied matrix counted once."""
        per_layer = self.layer_linear_params + self.norm_params_per_layer
        return (self.num_layers * per_layer + self.embedding_params + self.head_params
                + self.other_norm_params)


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is None:
        raise ConfigError(f"model config has none of {', '.join(names)}")
    return default


def _llama(cfg: Mapping[str, Any]) -> ModelShape:
    """Llama, Mistral, Qwen2, SmolLM: q/k/v/o and gate/up/down projections, RMSNorm."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    inter = cfg["intermediate_size"]
    attn_bias = bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    linears = (Linear("q_proj", h, heads * hd, attn_bias, "attention"),
               Linear("k_proj", h, kv * hd, attn_bias, "attention"),
               Linear("v_proj", h, kv * hd, attn_bias, "attention"),
               Linear("o_proj", heads * hd, h, bool(cfg.get("attention_bias", False)), "attention"),
               Linear("gate_proj", h, inter, mlp_bias, "mlp"),
               Linear("up_proj", h, inter, mlp_bias, "mlp"),
               Linear("down_proj", inter, h, mlp_bias, "mlp"))
    return ModelShape(cfg.get("model_type", "llama"), cfg["vocab_size"], h, cfg["num_hidden_layers"], heads, kv,
                      hd, inter, linears, 2 * h, h, 0, bool(cfg.get("tie_word_embeddings", False)), True)


def _bloom(cfg: Mapping[str, Any]) -> ModelShape:
    """BLOOM: fused query_key_value, dense, dense_h_to_4h, dense_4h_to_h (all with bias), LayerNorm."""
    h = _get(cfg, "hidden_size", "n_embed")
    heads = _get(cfg, "n_head", "num_attention_heads")
    linears = (Linear("query_key_value", h, 3 * h, True, "attention"),
               Linear("dense", h, h, True, "attention"),
               Linear("dense_h_to_4h", h, 4 * h, True, "mlp"),
               Linear("dense_4h_to_h", 4 * h, h, True, "mlp"))
    return ModelShape("bloom", cfg["vocab_size"], h, _get(cfg, "n_layer", "num_hidden_layers"), heads, heads,
                      h // heads, 4 * h, linears, 4 * h, 4 * h, 0, True, False)


def _gpt2(cfg: Mapping[str, Any]) -> ModelShape:
    """GPT-2: Conv1D c_attn, c_proj (attention) and c_fc, c_proj (MLP), LayerNorm, learned positions."""
    h, heads = cfg["n_embd"], cfg["n_head"]
    inner = cfg.get("n_inner") or 4 * h
    linears = (Linear("c_attn", h, 3 * h, True, "attention"), Linear("c_proj", h, h, True, "attention"),
               Linear("c_fc", h, inner, True, "mlp"), Linear("c_proj", inner, h, True, "mlp"))
    return ModelShape("gpt2", cfg["vocab_size"], h, cfg["n_layer"], heads, heads, h // heads, inner, linears,
                      4 * h, 2 * h, cfg["n_positions"] * h, bool(cfg.get("tie_word_embeddings", True)), False)


# model_type -> reader; Llama-shaped families share one
SHAPE_READERS: dict[str, Callable[[Mapping[str, Any]], ModelShape]] = {
    "llama": _llama, "mistral": _llama, "qwen2": _llama, "bloom": _bloom, "gpt2": _gpt2,
}


def shape_from_config(cfg: Any) -> ModelShape:
    """The ModelShape of a Hugging Face config (dict or PretrainedConfig)."""
    values = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
    model_type = values.get("model_type")
    if model_type not in SHAPE_READERS:
        raise ConfigError(f"calc knows no architecture {model_type!r}; supported model types: "
                          f"{', '.join(SHAPE_READERS)}")
    return SHAPE_READERS[model_type](values)
