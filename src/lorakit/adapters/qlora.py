"""QLoRA: LoRA on a 4-bit quantised base (Dettmers et al. 2023, arXiv:2305.14314).

`lorakit.apply(model, QLoRA(...))` first swaps every `nn.Linear` of the model, except the output
head, for a bitsandbytes `Linear4bit` whose weight is stored as 4-bit NF4 (or FP4) codes, one
absmax scale per block of 64 weights and, with double quantisation, those scales themselves
quantised to 8 bits in blocks of 256 (paper section 3). Then LoRA wraps the target layers as
usual; A and B stay in float32, and the frozen base runs in `compute_dtype`:

    y = dequant(W_4bit) x + s * B A x.

Quantising after load works on CPU and GPU alike (bitsandbytes quantises on the weight's
device), so `method: {name: qlora}` in a train config is all it takes; no model option is needed.
Embeddings and the output head stay unquantised, as in the paper and transformers.

Merging into a 4-bit base means dequantise, merge, and optionally re-quantise (`merge(model,
requantize=True)`); re-quantising rounds the merged weight to 4 bits again, so the merged model
differs slightly from the adapted one (benchmarks/qlora_memory.py measures by how much).
"""
from __future__ import annotations

import ctypes
import gc

import torch
from torch import nn

from lorakit import dtypes
from lorakit.adapters import lora, ops
from lorakit.adapters.config import QLoRA
from lorakit.adapters.layers import LayerKind, LoRALayer, register_layer_kind
from lorakit.adapters.match import find_targets, resolve_modules_to_save
from lorakit.adapters.state import ensure_plain, lora_layers, replace_module, require_state
from lorakit.errors import AdapterError
from lorakit.optional import require

BLOCKSIZE = 64  # weights per absmax scale (bitsandbytes' 4-bit default, the paper's choice)


def _bnb():
    """bitsandbytes, imported on first use (it takes seconds) with its layer kind registered;
    without it, one line naming the `quant` extra."""
    bitsandbytes = require("bitsandbytes", "quant", "QLoRA (method qlora)")
    register_layer_kind(bitsandbytes.nn.Linear4bit, LayerKind(fan_in_fan_out=False, forward=_linear4bit_forward))
    return bitsandbytes


def _linear4bit_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = dequant(W) x + b in the dtype W was quantised from (the compute dtype), returned in x's dtype."""
    import bitsandbytes

    compute = weight.quant_state.dtype
    bias = None if bias is None else bias.to(compute)
    return bitsandbytes.matmul_4bit(x.to(compute), weight, bias=bias, quant_state=weight.quant_state).to(x.dtype)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The (d_out, d_in) weight a 4-bit Params4bit stands for, in its compute dtype."""
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)


def quantize_linear(linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weight in 4 bits (on the weight's device) and its bias."""
    bnb = _bnb()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                          compress_statistics=double_quant, quant_type=quant_type, device="meta")
    data = linear.weight.detach().to(compute_dtype)  # (d_out, d_in); quantised from the compute dtype
    q.weight = bnb.nn.Params4bit(data, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                 quant_type=quant_type, module=q).to(data.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # bitsandbytes repacks a CPU weight in place on its first eval forward when the CPU has AVX512-BF16,
    # which needs d_out % 32 == 0 (Llama's k/v projections often fail it); keep the standard layout
    q.support_avx512bf16_for_cpu = False
    q.train(linear.training)
    return q


def quantizable_paths(model: nn.Module) -> list[str]:
    """Paths of the nn.Linear layers QLoRA quantises: all but the output head (embeddings are not Linear)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: str = "bf16", skip: tuple[str, ...] = ()) -> list[str]:
    """Swap the model's nn.Linear layers (not the output head, not `skip`) for 4-bit ones in place."""
    dtype = dtypes.to_torch(compute_dtype, "method.compute_dtype")
    paths = [p for p in quantizable_paths(model) if not any(p == s or p.startswith(s + ".") for s in skip)]
    for path in paths:
        replace_module(model, path, quantize_linear(model.get_submodule(path), quant_type, double_quant, dtype))
    _copy_off_checkpoint(model)
    release_freed_memory()
    return paths


@torch.no_grad()
def _copy_off_checkpoint(model: nn.Module) -> None:
    """Give the unquantised CPU tensors (embeddings, norms, head) their own memory.

    A model loaded from safetensors on CPU keeps its tensors in a memory map of the file; while one
    tensor still points into it, every page quantisation read stays resident (figures in
    benchmarks/RESULTS.md, "Measured in passing").
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and getattr(tensor, "quant_state", None) is None:
            tensor.data = tensor.data.clone()


def release_freed_memory() -> None:
    """Hand the replaced full-precision weights back to the OS.

    On CPU, glibc keeps freed heap pages resident; without a trim, quantising after load leaves
    the process about as large as the unquantised model (benchmarks/RESULTS.md, "Measured in
    passing"). On GPU, the caching allocator's free blocks are released.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def storage_bytes(weight: torch.Tensor) -> int:
    """Bytes a 4-bit weight (Params4bit) takes: the packed codes plus its quantisation state (scales, code book)."""
    stats = weight.quant_state.as_dict(packed=True)
    return weight.data.numel() * weight.data.element_size() + sum(
        t.numel() * t.element_size() for t in stats.values() if isinstance(t, torch.Tensor))


def apply(cfg: QLoRA, model: nn.Module) -> nn.Module:
    """Quantise the base's linear layers to 4 bits, then inject LoRA into the targets; returns the model."""
    ensure_plain(model)
    _check_targets(cfg, model)
    saved = resolve_modules_to_save(model, cfg.modules_to_save)  # trained in full: not quantised
    quantize_model(model, cfg.quant_type, cfg.double_quant, cfg.compute_dtype, skip=tuple(saved))
    return lora.apply(cfg, model)


def _check_targets(cfg: QLoRA, model: nn.Module) -> None:
    """Every target must be an nn.Linear that gets quantised (or is 4-bit already); say which one is not."""
    quantizable = set(quantizable_paths(model))
    for path in find_targets(model, cfg.targets):
        module = model.get_submodule(path)
        if path not in quantizable and not isinstance(module, _bnb().nn.Linear4bit):
            raise AdapterError(f"QLoRA cannot quantise module {path!r} ({type(module).__name__}): bitsandbytes "
                               "4-bit layers replace nn.Linear only, and the output head stays unquantised; "
                               "target nn.Linear layers or use method 'lora'")


# saved, loaded and added by name as a PEFT LoRA folder (onto an unquantised base), removed like LoRA
save, load_folder, named, unload = lora.save, lora.load_folder, lora.named, lora.unload


def merge(cfg: QLoRA, model: nn.Module, *, requantize: bool = False, safe: bool = True,
          keep_layers: bool = False) -> nn.Module:
    """Dequantise each 4-bit base, fold the LoRA delta in, and re-quantise when `requantize`."""
    return merge_quantized(model, requantize=requantize, safe=safe, keep_layers=keep_layers)


def count(cfg: QLoRA, model: nn.Module) -> dict[str, int]:
    """LoRA's count: the adapters are the same and the 4-bit base does not train (on a meta skeleton nothing is
    quantised; the storage of the base is `storage_bytes`' and the memory calculator's business)."""
    return lora.count(cfg, model)


def merge_quantized(model: nn.Module, *, requantize: bool = False, safe: bool = True,
                    keep_layers: bool = False) -> nn.Module:
    """Merge a QLoRA model: 4-bit bases become plain nn.Linear in the model's dtype (see the module docstring)."""
    if requantize and keep_layers:
        raise AdapterError("merge(requantize=True) cannot keep the LoRA layers: a re-quantised weight cannot be "
                           "unmerged exactly; use keep_layers=False")
    cfg = require_state(model).method
    dtype = model.get_input_embeddings().weight.dtype  # the unquantised parameters' dtype
    targets = []
    for path, layer in lora_layers(model):
        if isinstance(layer.weight, _bnb().nn.Params4bit):
            layer.replace_base(_dequantized_linear(layer, dtype))
            targets.append(path)
    ops.merge(model, safe=safe, keep_layers=keep_layers)
    if requantize:
        for path in targets:
            replace_module(model, path, quantize_linear(model.get_submodule(path), cfg.quant_type, cfg.double_quant,
                                                        dtypes.to_torch(cfg.compute_dtype)))
    return model


def _dequantized_linear(layer: LoRALayer, dtype: torch.dtype) -> nn.Linear:
    weight = dequantize(layer.weight).to(dtype)  # (d_out, d_in)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear
