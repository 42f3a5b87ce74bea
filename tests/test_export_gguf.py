"""GGUF export (`lorakit export --format gguf`), read back with the gguf package's own reader.

The files are checked here for what llama.cpp reads: tensor names, shapes and types, the hyperparameters and
tokenizer metadata, weights equal to the merged model's (Q/K rows in llama.cpp's rotary order, proven by
rotating both ways). tests/test_gguf_llamacpp.py runs the same files in llama.cpp (`make test-gguf`).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny import tiny_sp_tokenizer
from _tol import tol
from conftest import tiny_gpt2
from gguf_fixtures import embedded_adapter, random_lora, styled_tokenizer, tiny_llama_adapter, tiny_llama_folder

from lorakit.adapters import merge
from lorakit.cli import main
from lorakit.export import export_gguf, export_lora_gguf, permute_qk, unpermute_qk, write_model_gguf
from lorakit.export.arch import UnsupportedArchitecture
from lorakit.export.vocab import UnsupportedTokenizer, gguf_vocab
from lorakit.export.writer import tensor_type
from lorakit.models import load_model, load_tokenizer

gguf = pytest.importorskip("gguf", reason="the 'gguf' extra is not installed")


def read(path):
    """(tensors by name, metadata by key) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return {t.name: t for t in reader.tensors}, fields


def values(tensor) -> np.ndarray:
    """A GGUF tensor's values as float32 (dequantized), in transformers' (rows, columns) shape."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, adapter folder) of the tiny Llama."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama_folder(root / "model")
    return model, tiny_llama_adapter(model, root / "adapter")


# --- the Q/K permutation ---------------------------------------------------------------------------------------

def halves_rope(x: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """transformers' rotary embedding of one position on (heads, head_dim): dimension i pairs with i + d/2."""
    d = x.shape[-1]
    angle = position * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    return x * cos + rotated * sin


def pairs_rope(x: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """llama.cpp's LLAMA rotary embedding (GGML_ROPE_TYPE_NORM): dimension 2i pairs with 2i + 1."""
    d = x.shape[-1]
    angle = position * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angle.cos() - odd * angle.sin()
    out[..., 1::2] = even * angle.sin() + odd * angle.cos()
    return out


@pytest.mark.parametrize("heads,head_dim,columns", [(4, 8, 32), (2, 32, 128), (1, 2, 3)])
def test_permute_qk_round_trips(heads, head_dim, columns):
    weight = torch.randn(heads * head_dim, columns, generator=torch.Generator().manual_seed(heads))
    permuted = permute_qk(weight, heads)
    assert not torch.equal(permuted, weight) or head_dim == 2
    assert torch.equal(unpermute_qk(permuted, heads), weight)
    assert torch.equal(unpermute_qk(permute_qk(weight[:, 0], heads), heads), weight[:, 0])  # a bias
    assert np.array_equal(unpermute_qk(permute_qk(weight.numpy(), heads), heads), weight.numpy())


@pytest.mark.parametrize("position", [0, 1, 7, 300])
def test_permuted_rows_rotate_as_transformers_does(position):
    """llama.cpp's pairwise rotation of the permuted query equals the permuted transformers rotation."""
    heads, head_dim = 4, 16
    query = torch.randn(heads * head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(position))
    expected = permute_qk(halves_rope(query.view(heads, head_dim), position).reshape(-1), heads)
    actual = pairs_rope(permute_qk(query, heads).view(heads, head_dim), position).reshape(-1)
    torch.testing.assert_close(actual, expected, **tol(torch.float64, reduction=head_dim))
    unpermuted = pairs_rope(query.view(heads, head_dim), position).reshape(-1)  # without the permutation: wrong
    assert (unpermuted - halves_rope(query.view(heads, head_dim), position).reshape(-1)).abs().max() > 0.1 \
        or position == 0


# --- the merged model's file --------------------------------------------------------------------------------

def test_embedded_model_with_adapter_reads_back(tmp_path):
    adapter = embedded_adapter(tmp_path / "tuned")
    path = export_gguf(adapter, tmp_path / "merged.gguf", log=lambda line: None)
    tensors, meta = read(path)
    base = load_model("embedded", dtype="float32")
    merged = merge(random_lora(load_model("embedded", dtype="float32")))
    config = base.config
    assert len(tensors) == 2 + 9 * config.num_hidden_layers and "output.weight" not in tensors  # tied head
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.name"] == "tuned" and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    expected = {"llama.block_count": 4, "llama.embedding_length": 128, "llama.feed_forward_length": 512,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4, "llama.context_length": 512,
                "llama.rope.dimension_count": 32, "llama.attention.key_length": 32, "llama.vocab_size": 2048,
                "llama.rope.freq_base": 10000.0}
    assert {key: meta[key] for key in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    weights = dict(merged.named_parameters())
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        query, key = weights[prefix + "self_attn.q_proj.weight"], weights[prefix + "self_attn.k_proj.weight"]
        stored = values(tensors[f"blk.{layer}.attn_q.weight"])
        assert np.array_equal(stored, permute_qk(query.detach().numpy(), 4))
        assert np.array_equal(unpermute_qk(stored, 4), query.detach().numpy())
        assert np.array_equal(unpermute_qk(values(tensors[f"blk.{layer}.attn_k.weight"]), 4), key.detach().numpy())
        assert np.array_equal(values(tensors[f"blk.{layer}.ffn_down.weight"]),
                              weights[prefix + "mlp.down_proj.weight"].detach().numpy())
        assert tensors[f"blk.{layer}.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    base_down = base.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert not np.array_equal(values(tensors["blk.0.ffn_down.weight"]), base_down)  # the adapter is merged in
    assert np.array_equal(values(tensors["token_embd.weight"]), base.model.embed_tokens.weight.detach().numpy())


def test_embedded_tokenizer_metadata(tmp_path):
    tensors, meta = read(export_gguf("embedded", tmp_path / "base.gguf", log=lambda line: None))
    tokenizer = load_tokenizer("embedded")
    vocab = tokenizer.get_vocab()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 2048 and all(tokens[index] == token for token, index in vocab.items())
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 1]  # <|endoftext|>, <|pad|> control; then normal
    assert len(meta["tokenizer.ggml.merges"]) == 1790 and all(" " in merge for merge in meta["tokenizer.ggml.merges"])
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (0, 0, 1)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert "{% generation %}" not in meta["tokenizer.chat_template"] and "Question:" in meta["tokenizer.chat_template"]


def test_tiny_llama_untied_gqa_and_bos(tiny, tmp_path):
    model_folder, _ = tiny
    tensors, meta = read(export_gguf(model_folder, tmp_path / "tiny.gguf", log=lambda line: None))
    model = load_model(model_folder, dtype="float32")
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert list(tensors["blk.0.attn_k.weight"].shape) == [32, 16]  # ggml order: (columns, rows)
    key = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    assert np.array_equal(values(tensors["blk.1.attn_k.weight"]), permute_qk(key, 2))  # k: key/value heads
    assert np.array_equal(values(tensors["output.weight"]), model.lm_head.weight.detach().numpy())
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1


@pytest.mark.parametrize("quant,matrix_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_quant_types(tiny, tmp_path, quant, matrix_type):
    model_folder, _ = tiny
    tensors, meta = read(export_gguf(model_folder, tmp_path / f"tiny-{quant}.gguf", quant=quant,
                                     log=lambda line: None))
    model = load_model(model_folder, dtype="float32")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == matrix_type
    assert tensors["blk.0.ffn_norm.weight"].tensor_type.name == "F32"  # 1-D tensors stay f32
    weight = model.model.layers[0].mlp.up_proj.weight.detach()
    stored = torch.from_numpy(values(tensors["blk.0.ffn_up.weight"]))
    if quant == "q8_0":  # one scale per 32 values: each value within half a step of max|block| / 127
        blocks = weight.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
        step = blocks / 127
        error = (stored.reshape(-1, 32) - weight.reshape(-1, 32)).abs()
        assert bool((error <= step / 2 + blocks * torch.finfo(torch.float16).eps).all())  # + the f16 scale's rounding
    else:
        dtype = torch.float16 if quant == "f16" else torch.bfloat16
        assert torch.equal(stored, weight.to(dtype).float())
    assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[quant]


def test_q8_0_falls_back_to_f16_for_rows_not_in_blocks_of_32():
    types = gguf.GGMLQuantizationType
    assert tensor_type((64, 48), "q8_0") == types.F16 and tensor_type((64, 64), "q8_0") == types.Q8_0
    assert tensor_type((64,), "q8_0") == types.F32 and tensor_type((64, 64), "f32") == types.F32


def test_llama3_rope_frequencies_go_in_rope_freqs(tiny, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = tiny_llama_folder(tmp_path / "model", rope_parameters=rope, head_dim=16)
    tensors, meta = read(export_gguf(folder, tmp_path / "llama3.gguf", log=lambda line: None))
    model = load_model(folder, dtype="float32")
    rotary = model.model.rotary_emb
    default = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    factors = torch.from_numpy(values(tensors["rope_freqs.weight"]).copy())
    torch.testing.assert_close(default / factors, rotary.inv_freq, **tol(torch.float32))
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low ones divided by the factor
    plain = read(export_gguf(tiny[0], tmp_path / "plain.gguf", log=lambda line: None))[0]
    assert "rope_freqs.weight" not in plain  # default frequencies: llama.cpp's own


# --- the adapter alone ----------------------------------------------------------------------------------------

def test_adapter_only_reads_back(tiny, tmp_path):
    model_folder, adapter = tiny
    tensors, meta = read(export_lora_gguf(adapter, tmp_path / "lora.gguf", log=lambda line: None))
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0 and meta["general.architecture"] == "llama"
    assert len(tensors) == 2 * 7 * 2  # A and B of seven matrices in two blocks
    lora = random_lora(load_model(model_folder, dtype="float32"))
    attention = lora.model.layers[1].self_attn
    assert np.array_equal(values(tensors["blk.1.attn_q.weight.lora_a"]), attention.q_proj.lora_A.weight.detach().numpy())
    assert np.array_equal(values(tensors["blk.1.attn_k.weight.lora_b"]),
                          permute_qk(attention.k_proj.lora_B.weight.detach().numpy(), 2))
    assert np.array_equal(values(tensors["blk.1.attn_v.weight.lora_b"]), attention.v_proj.lora_B.weight.detach().numpy())


def test_adapter_only_rslora_alpha_is_the_scaling_times_rank(tiny, tmp_path):
    model_folder, _ = tiny
    adapter = tiny_llama_adapter(model_folder, tmp_path / "rs", r=4, alpha=8.0, rslora=True)
    _, meta = read(export_lora_gguf(adapter, tmp_path / "rs.gguf", log=lambda line: None))
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0 / math.sqrt(4) * 4)  # llama.cpp scales by alpha / r


def test_adapter_only_refuses_dora(tiny, tmp_path):
    from lorakit.adapters import DoRA, apply, save_adapter

    model_folder, _ = tiny
    save_adapter(apply(load_model(model_folder), DoRA(r=2, targets="q_proj")), tmp_path / "dora", str(model_folder))
    with pytest.raises(Exception, match="--adapter-only exports LoRA adapters; this one is DoRA"):
        export_lora_gguf(tmp_path / "dora", tmp_path / "dora.gguf", log=lambda line: None)


# --- refusals and the command line ----------------------------------------------------------------------------

def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(folder)
    with pytest.raises(UnsupportedArchitecture):
        write_model_gguf(tiny_gpt2(), None, tmp_path / "x.gguf")
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "gpt2.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: GGUF export does not support the GPT2LMHeadModel architecture; supported: "
                   "LlamaForCausalLM\n")
    assert not (tmp_path / "gpt2.gguf").exists()


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm"])
def test_pre_tokenizers_are_named_as_llamacpp_names_them(pre):
    tokenizer = styled_tokenizer(pre)
    assert gguf_vocab(tokenizer, len(tokenizer)).pre == pre


def test_unsupported_tokenizer_says_why():
    with pytest.raises(UnsupportedTokenizer, match="byte-level BPE tokenizers with GPT-2's, SmolLM's, Llama 3's "
                                                   "or Qwen2's pre-tokenizer; this tokenizer's is"):
        gguf_vocab(tiny_sp_tokenizer(), 256)


def test_cli_exports_and_exit_codes(tiny, tmp_path, capsys, monkeypatch):
    _, adapter = tiny
    out = tmp_path / "cli.gguf"
    assert main(["export", str(adapter), "--format", "gguf", "--quant", "f16", "--out", str(out)]) == 0
    assert f"GGUF model written to {out}" in capsys.readouterr().out
    assert read(out)[1]["general.file_type"] == 1
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(out)]) == 2  # never overwrites
    assert capsys.readouterr().err == f"error: {out} already exists; pick another --out or remove it\n"
    assert main(["export", str(adapter), "--format", "gguf", "--quant", "q4_k"]) == 2  # argparse: bad choice
    assert main(["export", str(adapter)]) == 2  # --format is required
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(adapter), "--format", "gguf", "--adapter-only"]) == 0
    assert (tmp_path / f"{adapter.parent.name}-lora-f32.gguf").is_file()  # the default name: the run's
    assert main(["export", str(tmp_path / "missing"), "--format", "gguf", "--base", "embedded"]) == 2
    assert "is not a folder" in capsys.readouterr().err
