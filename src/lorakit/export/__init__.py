"""Export for other runtimes: a merged model (or a LoRA adapter) as one GGUF file for llama.cpp, Ollama and
LM Studio, written with the `gguf` package (the 'gguf' extra).

    lorakit.export.export_gguf("runs/quickstart", "quickstart-f16.gguf", quant="f16")

`arch.py` says which transformers architectures export and how their tensors map (llama.cpp's Q/K row
order included), `vocab.py` writes the tokenizer as metadata, `writer.py` the tensors in each quant type,
`model.py` the merged model and `lora.py` a LoRA adapter alone. Names are exported lazily, so the CLI's
--help does not import torch.
"""
from __future__ import annotations

from lorakit._lazy import lazy_exports

_EXPORTS = {
    "export_gguf": "lorakit.export.model", "write_model_gguf": "lorakit.export.model",
    "export_lora_gguf": "lorakit.export.lora",
    "ARCHITECTURES": "lorakit.export.arch", "supported_architectures": "lorakit.export.arch",
    "permute_qk": "lorakit.export.arch", "unpermute_qk": "lorakit.export.arch",
    "QUANT_TYPES": "lorakit.export.writer",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
