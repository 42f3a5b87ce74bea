"""Lazy batches (collated when read) and packing efficiency on the speed benchmark's length mix."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from lorakit.data.batching import LazyBatches, collate_packed, make_batches, packing_efficiency
from lorakit.data.batching import pack_lengths

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def random_examples(n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=generator).tolist()
    return [{"input_ids": list(range(1, k + 1)), "labels": [-100] * (k // 2) + list(range(k // 2 + 1, k + 1))}
            for k in lengths]


def test_lazy_batches_collate_the_same_tensors_as_building_them_up_front():
    examples = random_examples(40)
    batches = make_batches(examples, 3, pack=True, max_length=64, pad_id=0, seed=5, epoch=1)
    assert isinstance(batches, LazyBatches)
    # the same packing done by hand, collated eagerly
    from lorakit.data.batching import epoch_order
    order = epoch_order(len(examples), 5, 1, True)
    rows = [[examples[order[j]] for j in row] for row in pack_lengths([len(examples[i]["input_ids"]) for i in order], 64)]
    eager = [collate_packed(rows[k:k + 3], 0) for k in range(0, len(rows), 3)]
    assert len(batches) == len(eager)
    for index, expected in enumerate(eager):
        for got in (batches[index], batches[index:index + 1][0], list(batches)[index]):
            assert got.keys() == expected.keys()
            for key in expected:
                assert torch.equal(got[key], expected[key]), (index, key)
    assert len(batches[1:3]) == 2 and batches[len(batches):] == []


def test_padded_batches_are_lazy_too_and_count_their_padding():
    examples = random_examples(10, seed=1)
    batches = make_batches(examples, 4, pack=False, max_length=64, pad_id=0, seed=0, epoch=0)
    real = sum(len(ex["input_ids"]) for ex in examples)
    computed = sum(b["input_ids"].numel() for b in batches)
    assert packing_efficiency(batches) == real / computed
    assert sum(int(b["attention_mask"].sum()) for b in batches) == real


def test_packing_keeps_95_percent_real_tokens_on_the_benchmark_length_mix():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from sft_workload import PROMPT_TEMPLATE, SIZES, make_tokenizer, workload_rows
    finally:
        sys.path.remove(str(BENCHMARKS))
    from lorakit.data import DataConfig, tokenize_rows

    size = SIZES["smollm"]
    tokenizer = make_tokenizer(size, seed=0)
    rows = workload_rows(160, size, tokenizer, seed=0)
    examples, _ = tokenize_rows(rows, tokenizer, DataConfig(format="prompt_completion", max_length=size.max_length,
                                                          prompt_template=PROMPT_TEMPLATE))
    assert min(len(ex["input_ids"]) for ex in examples) >= size.min_length
    for rows_per_batch in (1, 2, 4):
        batches = make_batches(examples, rows_per_batch, pack=True, max_length=size.pack_length,
                               pad_id=tokenizer.pad_token_id, seed=0, epoch=0)
        assert packing_efficiency(batches) >= 0.95, rows_per_batch
    padded = make_batches(examples, size.micro_batch, pack=False, max_length=size.max_length,
                          pad_id=tokenizer.pad_token_id, seed=0, epoch=0)
    assert packing_efficiency(padded) < 0.8  # what padding to the longest row costs on the same mix
