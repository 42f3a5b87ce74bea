"""Built-in models for `lorakit calc`: the public config numbers of common models, no download.

Each entry is the part of the model's config.json that sets its shapes; the calculator builds it
with transformers (`AutoConfig.for_model`) and goes on exactly as with a real config.json, so a
preset and the real config give the same counts. Parameters of their skeletons (checked in the
tests against the published counts): Llama-3.2-1B 1.24 B, Llama-3.1-8B 8.03 B, Llama-2-7B 6.74 B,
bloomz-560m 559 M, SmolLM2-135M 135 M.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "Llama-3.2-1B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 64, "tie_word_embeddings": True},
    "Llama-3.1-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 128, "tie_word_embeddings": False},
    # the "generic 7B" of the lecture: Llama-2-7B's shape
    "7B": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "tie_word_embeddings": False},
    "bloomz-560m": {"model_type": "bloom", "vocab_size": 250880, "hidden_size": 1024, "n_layer": 24,
                    "n_head": 16},
    "SmolLM2-135M": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "head_dim": 64, "tie_word_embeddings": True},
}
ALIASES = {"llama-2-7b": "7B", "generic-7b": "7B", "7b": "7B", "meta-llama/Llama-3.2-1B": "Llama-3.2-1B",
           "meta-llama/Llama-3.1-8B": "Llama-3.1-8B", "meta-llama/Llama-2-7b-hf": "7B",
           "bigscience/bloomz-560m": "bloomz-560m", "HuggingFaceTB/SmolLM2-135M": "SmolLM2-135M"}


def preset_config(name: str) -> dict | None:
    """The preset config dict for a preset name or alias (case-insensitive), or None."""
    lowered = {key.lower(): key for key in PRESETS}
    key = ALIASES.get(name) or ALIASES.get(name.lower()) or lowered.get(name.lower())
    return dict(PRESETS[key]) if key else None
