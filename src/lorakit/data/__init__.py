"""The data room: rows -> examples with an output-only loss mask -> padded or packed batches.

    cfg = DataConfig(source="data.jsonl", max_length=512, packing=True)
    train_rows, val_rows = load_rows(cfg)
    examples, stats = tokenize_rows(train_rows, tokenizer, cfg)
    print(preview_example(examples[0], tokenizer))        # trained tokens in [[...]]
    check_packing(model)                                   # once, when cfg.packing
    batches = make_batches(examples, 8, pack=cfg.packing, max_length=cfg.max_length,
                           pad_id=tokenizer.pad_token_id, seed=0, epoch=0)

Names are exported lazily, so reading DataConfig (e.g. for --help) does not import torch.
"""
from __future__ import annotations

from lorakit._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "DataConfig": "lorakit.data.config",
    "field_help": "lorakit.data.config",
    "load_rows": "lorakit.data.sources",
    "read_source": "lorakit.data.sources",
    "FORMATS": "lorakit.data.formats",
    "RowFormat": "lorakit.data.formats",
    "Rendered": "lorakit.data.formats",
    "register_format": "lorakit.data.formats",
    "detect_format": "lorakit.data.formats",
    "BUILTIN_CHAT_TEMPLATE": "lorakit.data.chat",
    "IGNORE_INDEX": "lorakit.labels",
    "Example": "lorakit.data.tokenize",
    "TokenizeStats": "lorakit.data.tokenize",
    "tokenize_rows": "lorakit.data.tokenize",
    "preview_example": "lorakit.data.tokenize",
    "make_batches": "lorakit.data.batching",
    "shift_labels": "lorakit.data.batching",
    "check_packing": "lorakit.data.packing",
    "pack_lengths": "lorakit.data.batching",
    "train_byte_bpe": "lorakit.data.bpe",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
