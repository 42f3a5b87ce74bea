"""Write a model (or a LoRA adapter) as one GGUF file with the `gguf` package.

Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases, rope_freqs) stay F32 whatever the
quant; matrices take the quant's type, and a matrix whose rows do not split into Q8_0 blocks of 32 falls
back to F16 under q8_0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from lorakit.errors import LorakitError
from lorakit.optional import require

if TYPE_CHECKING:
    import torch

QUANT_TYPES = ("f32", "f16", "bf16", "q8_0")  # --quant: ggml types every llama.cpp CPU build runs


def gguf_module():
    """The `gguf` package (the 'gguf' extra), or one line naming the extra."""
    return require("gguf", "gguf", "GGUF export")


def file_type(quant: str) -> int:
    """general.file_type for `quant` (llama.cpp's LlamaFileType)."""
    kinds = gguf_module().LlamaFileType
    check_quant(quant)
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[quant]


def check_quant(quant: str) -> None:
    """Refuse a quant type that is not one of QUANT_TYPES."""
    if quant not in QUANT_TYPES:
        raise LorakitError(f"unknown GGUF quant type {quant!r}; choose one of {', '.join(QUANT_TYPES)}")


def tensor_type(shape: tuple[int, ...], quant: str) -> Any:
    """The ggml type a tensor of `shape` is stored in under `quant`."""
    types = gguf_module().GGMLQuantizationType
    if len(shape) < 2 or quant == "f32":
        return types.F32
    if quant == "q8_0" and shape[-1] % 32:  # Q8_0 blocks of 32 along a row
        return types.F16
    return {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[quant]


def converted(tensor: torch.Tensor | np.ndarray, quant: str) -> np.ndarray:
    """One fp32 tensor in its ggml type under `quant`: float32 or float16 values, or a quantized block array."""
    gguf = gguf_module()
    array = tensor if isinstance(tensor, np.ndarray) else tensor.detach().to("cpu").float().numpy()
    array = np.ascontiguousarray(array, dtype=np.float32)
    kind = tensor_type(array.shape, quant)
    if kind == gguf.GGMLQuantizationType.F32:
        return array
    if kind == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind)


def write_gguf(path: str | Path, arch: str, describe: Callable[[Any], None], tensors: Sequence[tuple[str, Any]],
               quant: str) -> Path:
    """Write one GGUF file: `describe(writer)` adds the metadata keys, then `tensors` ((GGUF name, fp32 tensor),
    in order) are converted to `quant`'s types one at a time (no second copy of the model in memory). Written
    beside `path` and renamed: no partial file under its name."""
    gguf = gguf_module()
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        describe(writer)
        for name, tensor in tensors:
            shape = tuple(tensor.shape)
            kind = tensor_type(shape, quant)
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) // block * block_bytes,
                                   raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in tensors:
            writer.write_tensor_data(converted(tensor, quant))
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    partial.replace(path)
    return path
