"""`export_gguf`: a run, adapter or model folder (or a model name) -> one merged-model GGUF file for llama.cpp.

The adapter is folded into the base in fp32 by the adapters' own `merge` (the one merge of `lorakit merge`),
then each tensor is renamed to llama.cpp's name (the `gguf` package's tensor map), Q/K rows are reordered for
llama.cpp's rotary layout (arch.py) and converted to the quant's type (writer.py); the tokenizer goes in as
metadata (vocab.py), so the file alone runs in llama.cpp, Ollama or LM Studio.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lorakit.adapters import merge
from lorakit.data.prompting import run_name
from lorakit.errors import LorakitError
from lorakit.export.arch import GGUFArch, architecture_of, permute_qk, rope_frequency_factors, rope_heads
from lorakit.export.vocab import gguf_vocab, write_vocab
from lorakit.export.writer import check_quant, file_type, gguf_module, write_gguf
from lorakit.infer.generate import Target, load_target, resolve_target


def resolve_source(source: str | Path, base: str | None = None) -> Target:
    """What to load for `source`: a run, adapter or model folder (as every inference command reads them), else a
    model name ("embedded", a hub id); `base` replaces an adapter's recorded base."""
    if Path(source).expanduser().is_dir():
        return resolve_target(source, base)
    if base is not None:
        raise LorakitError(f"{source} is not a folder, so it is exported as a model and takes no --base; "
                           "give a run or adapter folder to export an adapter on a base")
    return resolve_target(None, str(source))


def load_merged(target: Target, log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """(the target's model in fp32 with its adapter merged in, tokenizer)."""
    model, tokenizer = load_target(target, dtype="float32", log=log)
    if target.adapter is not None:
        model = merge(model)
    return model.eval(), tokenizer


def default_out(source: str | Path, quant: str, kind: str = "") -> Path:
    """<run or model name>[-kind]-<quant>.gguf in the current folder."""
    name = run_name(source) if Path(source).expanduser().is_dir() else Path(str(source)).name
    return Path(f"{name}{'-' + kind if kind else ''}-{quant}.gguf")


def gguf_tensor_names(arch: GGUFArch, blocks: int) -> Any:
    """The gguf package's map from transformers tensor names to llama.cpp's for `arch`."""
    gguf = gguf_module()
    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]
    return gguf.get_tensor_name_map(model_arch, blocks)


def model_tensors(model: Any, arch: GGUFArch) -> list[tuple[str, Any]]:
    """(llama.cpp name, fp32 tensor) for every parameter (a tied output head once, as the embedding), Q/K rows
    permuted, plus rope_freqs when the model's rotary frequencies are not the defaults."""
    config = model.config
    names = gguf_tensor_names(arch, config.num_hidden_layers)
    tensors = []
    for name, parameter in model.named_parameters():  # shared (tied) parameters come once
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LorakitError(f"GGUF export has no llama.cpp name for tensor {name} of {arch.hf_class}")
        data = parameter.detach().float()
        heads = rope_heads(name, config) if arch.rope_permute else None
        tensors.append((gguf_name, permute_qk(data, heads) if heads else data))
    factors = rope_frequency_factors(model, arch)
    if factors is not None:
        tensors.append((gguf_module().TENSOR_NAMES[gguf_module().MODEL_TENSOR.ROPE_FREQS] + ".weight", factors))
    return tensors


def describe_llama(writer: Any, config: Any, quant: str) -> None:
    """The llama.* hyperparameters, as llama.cpp's LLAMA graph reads them."""
    gguf = gguf_module()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_model_gguf(model: Any, tokenizer: Any, out: str | Path, *, quant: str = "f32", name: str = "model") -> Path:
    """Write `model` (a supported architecture, fp32) and its tokenizer as one GGUF file at `out`."""
    check_quant(quant)
    arch = architecture_of(type(model).__name__)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    tensors = model_tensors(model, arch)

    def describe(writer: Any) -> None:
        writer.add_type(gguf_module().GGUFType.MODEL)
        writer.add_name(name)
        describe_llama(writer, model.config, quant)
        write_vocab(writer, vocab)

    return write_gguf(out, arch.gguf_arch, describe, tensors, quant)


def export_gguf(source: str | Path, out: str | Path | None = None, *, quant: str = "f32", base: str | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Export `source` (a run, adapter or model folder, or a model name) as a merged-model GGUF file: the adapter
    folded into `base` (default: the base recorded with the adapter) in fp32, stored as `quant`. Returns the path
    (default: <name>-<quant>.gguf in the current folder)."""
    check_quant(quant)
    gguf_module()  # a missing extra fails before any model loads
    out = Path(out) if out is not None else default_out(source, quant)
    if out.exists():
        raise LorakitError(f"{out} already exists; pick another --out or remove it")
    target = resolve_source(source, base)
    model, tokenizer = load_merged(target, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_model_gguf(model, tokenizer, out, quant=quant, name=run_name(target.source or target.model))
