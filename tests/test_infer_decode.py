"""decode()'s speed-ups (decoding/kv_cache.py's preallocated cache and grouped prefill, decoding/lora_fastpath.py's lean
and merged LoRA) against its plain loop, token by token, and against transformers' generate."""
from __future__ import annotations

import pytest
import torch
from _infer_fixtures import random_adapter
from _tol import TINY, tol
from conftest import TINY_MODELS, tiny_llama
from transformers import MistralConfig, MistralForCausalLM

import lorakit
from lorakit.adapters import DoRA
from lorakit.decoding import decode as decode_module
from lorakit.decoding import lora_fastpath
from lorakit.decoding.decode import PLAIN, Speedups, decode, left_pad
from lorakit.decoding.kv_cache import BufferedLayer, length_groups, preallocated_cache
from lorakit.decoding.lora_fastpath import lean_lora, merge_pays
from lorakit.decoding.sampling import Sampling

PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 12, list(range(50, 57)), [3], list(range(60, 90))]
BUDGETS = [9, 4, 12, 9, 3, 7]  # rows leave the batch at different steps
ONLY = {"cache": Speedups(True, False, False, False, False), "grouped": Speedups(True, True, False, False, False),
        "lean": Speedups(False, False, True, False, False), "merged": Speedups(False, False, False, True, False),
        "shared": Speedups(False, False, False, False, True)}


@pytest.fixture(params=sorted(TINY_MODELS))
def arch(request):
    return request.param


def _run(model, speedups, options=None, **kw):
    """(new ids per row, each kept token's logprob per row) of one decode call."""
    logprobs = [[] for _ in PROMPTS]
    options = options or [Sampling()] * len(PROMPTS)
    kw = {"max_new_tokens": BUDGETS, "stop_ids": set(), "pad_id": 0, "seeds": range(len(PROMPTS)), **kw}
    new = decode(model, PROMPTS, options, top_logprobs=[1] * len(PROMPTS),
                 on_logprobs=lambda row, info: logprobs[row].append(info.logprob), speedups=speedups, **kw)
    return new, logprobs


def _with_lora(build, tmp_path):
    return lorakit.load_adapter(build(), random_adapter(build, tmp_path / "adapter", 3)).eval()


def test_every_speedup_picks_the_plain_loops_tokens(arch, tmp_path, one_thread):
    """Greedy and seeded sampling, rows leaving at their own budgets and at a stop token: each speed-up alone and
    all together give the plain loop's ids, and per step the same log-probabilities (bitwise where the arithmetic
    is the same: cache, grouped prefill on one model call per group, lean LoRA; within fp32 rounding merged)."""
    model = _with_lora(TINY_MODELS[arch], tmp_path)
    sampled = [Sampling(temperature=0.9, top_k=20)] * 3 + [Sampling(repetition_penalty=1.3)] * 3
    for options in (None, sampled):
        plain, plain_lp = _run(model, PLAIN, options)
        stop = {plain[2][3]}  # a token row 2 picks: it and any row that picks it end there
        stopped = _run(model, PLAIN, options, stop_ids=stop)[0]
        assert stopped != plain
        for name, speedups in [*ONLY.items(), ("all", Speedups())]:
            new, logprobs = _run(model, speedups, options)
            assert new == plain, name
            assert _run(model, speedups, options, stop_ids=stop)[0] == stopped, name
            for row, expected in enumerate(plain_lp):
                if name in ("merged", "all"):
                    torch.testing.assert_close(torch.tensor(logprobs[row]), torch.tensor(expected),
                                               **tol(reduction=TINY))
                elif name != "grouped":  # a group's prompt pass has other shapes: other kernel blockings
                    assert logprobs[row] == expected, (name, row)


def test_greedy_ids_equal_transformers_generate(arch, tmp_path, one_thread):
    """The fast path (every speed-up) picks transformers' greedy tokens on the same left-padded batch."""
    model = _with_lora(TINY_MODELS[arch], tmp_path)
    ids, mask = left_pad(PROMPTS, 0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0,
                             eos_token_id=None)
    expected = out[:, ids.shape[1]:].tolist()
    assert decode(model, PROMPTS, [Sampling()] * len(PROMPTS), max_new_tokens=[8] * len(PROMPTS), stop_ids=set(),
                  pad_id=0) == expected


def test_fast_path_really_runs(monkeypatch, tmp_path, one_thread):
    """The speed-ups engage: one prompt pass per length group (none padded to the longest prompt), the buffered
    cache layers throughout, merged weights inside the call, and the model untouched afterwards."""
    model = _with_lora(tiny_llama, tmp_path)
    before = {name: p.clone() for name, p in model.named_parameters()}
    calls, forward = [], decode_module._forward

    def spy(model_, ids, mask, positions, cache, signature):
        calls.append((tuple(ids.shape), cache is not None and all(isinstance(layer, BufferedLayer)
                                                                   for layer in cache.layers)))
        layer = model_.model.layers[0].self_attn.q_proj
        assert "forward" in layer.__dict__  # the lean / merged forward
        return forward(model_, ids, mask, positions, cache, signature)

    monkeypatch.setattr(decode_module, "_forward", spy)
    decode(model, PROMPTS, [Sampling()] * len(PROMPTS), max_new_tokens=[3] * len(PROMPTS), stop_ids=set(), pad_id=0)
    groups = length_groups([len(p) for p in PROMPTS])
    assert [shape for shape, _ in calls[:len(groups)]] == [(len(g), max(len(PROMPTS[r]) for r in g)) for g in groups]
    assert len(groups) > 1 and all(buffered for _, buffered in calls)
    assert [shape for shape, _ in calls[len(groups):]] == [(len(PROMPTS), 1)] * 2
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_shared_prompts_run_one_prompt_pass_and_sample_each_row_as_alone(arch, monkeypatch, tmp_path, one_thread):
    """Repeated prompts (GRPO's groups): one prompt pass over the distinct prompts, then every row decodes with
    its own seed exactly as the plain loop does (same tokens; log-probabilities within fp32 rounding, since the
    prompt pass has another batch shape), alone and with the other speed-ups."""
    model = _with_lora(TINY_MODELS[arch], tmp_path)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[3]]
    options = [Sampling(temperature=1.0, top_k=30)] * len(prompts)
    budgets = [6, 3, 8, 5, 7, 2, 6, 4]

    def run(speedups):
        logprobs = [[] for _ in prompts]
        new = decode(model, prompts, options, max_new_tokens=budgets, stop_ids=set(), pad_id=0,
                     seeds=range(100, 100 + len(prompts)), top_logprobs=[1] * len(prompts),
                     on_logprobs=lambda row, info: logprobs[row].append(info.logprob), speedups=speedups)
        return new, logprobs

    plain, plain_lp = run(PLAIN)
    assert len({tuple(t) for t in plain[:3:2]}) == 2  # equal prompts, other seeds: other samples
    calls, forward = [], decode_module._forward
    monkeypatch.setattr(decode_module, "_forward", lambda m, ids, *rest: calls.append(ids.shape[0]) or forward(
        m, ids, *rest))
    for speedups in (ONLY["shared"], Speedups()):
        calls.clear()
        new, logprobs = run(speedups)
        assert new == plain
        for row, expected in enumerate(plain_lp):
            torch.testing.assert_close(torch.tensor(logprobs[row]), torch.tensor(expected), **tol(reduction=TINY))
        steps = max(map(len, plain)) - 1  # one forward per token after the first
        assert sum(calls[:len(calls) - steps]) == 3 and calls[len(calls) - steps] == len(prompts)  # 3 distinct


def test_first_of_each():
    assert decode_module.first_of_each([(1, 2), (3,), (1, 2), (3,), (4,)]) == ([0, 1, 4], [0, 1, 0, 1, 2])


def test_length_groups():
    assert length_groups([5]) == [[0]]
    assert length_groups([100, 99, 98, 10, 11, 9]) == [[0, 1, 2], [3, 4, 5]]  # longest group first
    assert length_groups([100, 10], fixed_cost=1000) == [[0, 1]]  # a pass costs more than the padding saved
    assert length_groups([100, 10], fixed_cost=0) == [[0], [1]]
    groups = length_groups([3, 30, 12, 7, 1, 30, 29, 64, 2])
    assert sorted(r for g in groups for r in g) == list(range(9))


def test_buffered_layer_grows_and_selects_rows():
    """Past its capacity the buffer doubles (up to the limit); keys/values always equal the concatenation."""
    layer = BufferedLayer(batch=2, capacity=3, limit=7)
    parts = [torch.randn(2, 2, n, 4) for n in (2, 1, 1, 3)]
    for i, part in enumerate(parts):
        keys, values = layer.update(part, -part)
        expected = torch.cat(parts[:i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        assert layer.get_seq_length() == keys.shape[2]
    assert layer.key_buffer.shape[2] == 7  # 3, then 6, then capped at the limit when 7 were needed
    layer.reorder_cache(torch.tensor([1]))
    assert torch.equal(layer.keys, torch.cat(parts, dim=2)[1:]) and layer.key_buffer.shape[0] == 1
    keys, _ = layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))  # beyond the limit: it still grows
    assert keys.shape[2] == 8 and torch.equal(keys[:, :, :7], torch.cat(parts, dim=2)[1:])


def test_sliding_window_cache_keeps_its_layers(one_thread):
    """A sliding-window model (Mistral) keeps transformers' own cache layers and one padded prompt pass, and
    still decodes what the plain loop decodes (windows smaller than the prompts)."""
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    cache, all_buffered = preallocated_cache(model, 2, 8, 8)
    assert cache is None and not all_buffered
    assert _run(model, Speedups())[0] == _run(model, PLAIN)[0]


def test_lean_lora_is_the_layers_own_arithmetic(tmp_path, one_thread):
    """Unmerged, the lean forward returns the LoRA layer's output bit for bit (any dtype mix); merged, within
    fp32 rounding; merging is refused for half-precision bases and DoRA, and the adapter switch is honoured."""
    model = _with_lora(tiny_llama, tmp_path)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = model(x.new_ones(3, 5, dtype=torch.long)).logits
        layer = model.model.layers[0].mlp.up_proj
        plain = layer(x)
        with lean_lora(model) as merged:
            assert not merged and torch.equal(layer(x), plain)
        with lean_lora(model, merge=True) as merged:
            assert merged
            torch.testing.assert_close(layer(x), plain, **tol(reduction=TINY))
            torch.testing.assert_close(model(x.new_ones(3, 5, dtype=torch.long)).logits, expected,
                                       **tol(reduction=TINY))
            layer.adapter_enabled = False
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
            layer.adapter_enabled = True
        half = _with_lora(tiny_llama, tmp_path / "half").to(torch.bfloat16)
        with lean_lora(half, merge=True) as merged:
            assert not merged
        dora = lorakit.load_adapter(tiny_llama(), random_adapter(tiny_llama, tmp_path / "dora", 4, method=DoRA))
        with lean_lora(dora, merge=True) as merged:
            assert not merged  # no plain LoRA layers: DoRA keeps its own forward


def test_half_precision_lora_decodes_as_plain(tmp_path, one_thread):
    """A bf16 base with its fp32 adapter: the lean forward keeps the mixed-precision arithmetic exactly."""
    model = _with_lora(tiny_llama, tmp_path).to(torch.bfloat16)
    for layer in model.modules():
        if hasattr(layer, "lora_A"):
            layer.lora_A.float(), layer.lora_B.float()
    plain, plain_lp = _run(model, PLAIN)
    new, logprobs = _run(model, Speedups(grouped_prefill=False))
    assert new == plain and logprobs == plain_lp


def test_peft_wrapped_model_decodes_as_plain(tmp_path, one_thread):
    """A peft model's forward takes no position ids (GPT-2 then counts positions from the padding): its prompt
    pass stays one padded batch, so the fast path still picks the plain loop's tokens."""
    from conftest import tiny_gpt2
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_gpt2(), str(random_adapter(tiny_gpt2, tmp_path / "adapter", 1))).eval()
    assert _run(model, Speedups())[0] == _run(model, PLAIN)[0]


def test_merge_pays_weighs_the_copy_against_the_saved_work(monkeypatch, tmp_path):
    """Merging is chosen when the LoRA work a call saves exceeds the cost of copying the weights: a long call
    on the tiny model merges, a one-token call never does, and a copy made costly does not pay."""
    model = _with_lora(tiny_llama, tmp_path)
    assert merge_pays(model, PROMPTS, [32] * len(PROMPTS))
    assert not merge_pays(model, PROMPTS, [1] * len(PROMPTS))
    assert not merge_pays(tiny_llama(), PROMPTS, [32] * len(PROMPTS))  # no LoRA layers
    monkeypatch.setattr(lora_fastpath, "MERGE_BYTES_PER_S", 1.0)
    assert not merge_pays(model, PROMPTS, [32] * len(PROMPTS))
