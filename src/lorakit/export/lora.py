"""`export_lora_gguf`: a LoRA adapter alone as a GGUF LoRA, which llama.cpp applies on the base GGUF at load time
(`llama-cli -m base.gguf --lora adapter.gguf`).

llama.cpp's format: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and for each adapted base
tensor T two tensors T.lora_a (r x d_in, lorakit's A) and T.lora_b (d_out x r, lorakit's B, its Q/K rows in
llama.cpp's order as the base's are); llama.cpp scales the branch by alpha / r, r read from each tensor's shape.
The alpha written is the adapter's scaling times its rank, so rsLoRA exports too; a layer whose scaling times
rank differs from the first's has the ratio folded into its B. Only LoRA layers of the transformer blocks
export: DoRA's magnitude, trained biases, modules_to_save or a tied output head have no place in the format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lorakit.adapters.config import LoRA
from lorakit.adapters.layers import LoRALayer
from lorakit.adapters.state import get_state
from lorakit.errors import LorakitError
from lorakit.export.arch import GGUFArch, architecture_of, permute_qk, rope_heads
from lorakit.export.model import default_out, gguf_tensor_names, resolve_source
from lorakit.export.writer import check_quant, gguf_module, write_gguf
from lorakit.data.prompting import run_name
from lorakit.infer.generate import load_target


def check_exportable(model: Any) -> None:
    """Refuse an adapter that llama.cpp's LoRA format cannot hold, naming what is in the way."""
    state = get_state(model)
    if state is None:
        raise LorakitError("--adapter-only needs an adapter: give a run or adapter folder, not a model")
    if type(state.method) is not LoRA:
        raise LorakitError(f"--adapter-only exports LoRA adapters; this one is {type(state.method).__name__} "
                           "(export the merged model instead, without --adapter-only)")
    if state.saved_modules or state.bias_backup:
        extra = ", ".join(state.saved_modules + sorted(state.bias_backup))
        raise LorakitError(f"--adapter-only cannot hold trained modules or biases ({extra}); export the merged model")


def lora_tensors(model: Any, arch: GGUFArch) -> tuple[float, list[tuple[str, Any]]]:
    """(alpha, [(name.lora_a, A), (name.lora_b, B), ...]) of every LoRA layer, in model order."""
    names = gguf_tensor_names(arch, model.config.num_hidden_layers)
    layers = [(path, module) for path, module in model.named_modules() if type(module) is LoRALayer]
    if not layers:
        raise LorakitError("--adapter-only found no LoRA layers on the model")
    alpha = layers[0][1].scaling * layers[0][1].r
    tensors = []
    for path, layer in layers:
        base_name = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
        if base_name is None or not base_name.startswith("blk."):
            raise LorakitError(f"--adapter-only cannot export the LoRA on {path}: llama.cpp applies LoRA to the "
                               "transformer blocks' matrices only; export the merged model instead")
        A = layer.lora_A.weight.detach().float()  # (r, d_in)
        B = layer.lora_B.weight.detach().float() * (layer.scaling * layer.r / alpha)  # (d_out, r); 1.0 when uniform
        heads = rope_heads(path + ".", model.config) if arch.rope_permute else None
        tensors += [(f"{base_name}.lora_a", A), (f"{base_name}.lora_b", permute_qk(B, heads) if heads else B)]
    return alpha, tensors


def export_lora_gguf(source: str | Path, out: str | Path | None = None, *, quant: str = "f32",
                     base: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Export the LoRA adapter of `source` (a run or adapter folder) as a GGUF LoRA for the base's GGUF file
    (`export_gguf` of the base model). Returns the path (default: <name>-lora-<quant>.gguf here)."""
    check_quant(quant)
    gguf = gguf_module()
    out = Path(out) if out is not None else default_out(source, quant, "lora")
    if out.exists():
        raise LorakitError(f"{out} already exists; pick another --out or remove it")
    target = resolve_source(source, base)
    model, _ = load_target(target, dtype="float32", log=log)
    arch = architecture_of(type(model).__name__)
    check_exportable(model)
    alpha, tensors = lora_tensors(model, arch)

    def describe(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(run_name(target.source or source))
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(out, arch.gguf_arch, describe, tensors, quant)
