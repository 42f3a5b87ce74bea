"""Section (i)'s pure pieces: which arms it adds and reads, run folders per variant, lr x alpha, step times."""
from __future__ import annotations

import dataclasses

import numpy as np

from lorakit.lab import capacity, experiments, more
from lorakit.lab.claims import is_recipe, lora_ranks
from lorakit.lab.evidence import Estimate


def _results() -> dict:
    """The arms of a lab with (i), as results.json names them (only the fields (i) reads)."""
    arms = {name: {"method": arm.method, "r": arm.r, "targets": arm.targets, "alpha": arm.alpha,
                   "micro_batch": arm.micro_batch} for name, arm in experiments.lab_arms(experiments.FULL).items()}
    return {"arms": arms, "alpha": experiments.ALPHA, "reference_rank": experiments.REFERENCE_RANK,
            "recipe": {"micro_batch_size": 16}}


def test_more_arms_and_their_folders():
    arms = experiments.more_arms(experiments.FULL)
    assert set(arms) == {"dora-r16", "qlora-r16", "lora-r16-alpha8", "lora-r16-alpha128", "lora-r16-mb4",
                         "lora-r16-mb64", "full-mb64"}
    assert [name for name, arm in arms.items() if not arm.finals] == ["lora-r16-alpha8", "lora-r16-alpha128"]
    assert arms["lora-r16-alpha8"].variant == "-alpha8" and arms["full-mb64"].variant == "-mb64"
    assert arms["dora-r16"].variant == "" and arms["lora-r16-alpha128"].cell(0) == arms["lora-r16-mb4"].cell(0)
    assert experiments.more_arms(dataclasses.replace(experiments.QUICK, more=False)) == {}


def test_section_reads_the_right_arms():
    results = _results()
    assert more.alpha_arms(results) == [(8.0, "lora-r16-alpha8"), (32.0, "lora-r16"),
                                        (128.0, "lora-r16-alpha128")]
    assert more.batch_arms(results, "lora") == [(4, "lora-r16-mb4"), (16, "lora-r16"), (64, "lora-r16-mb64")]
    assert more.batch_arms(results, "full") == [(16, "full"), (64, "full-mb64")]
    assert lora_ranks(results) == ["lora-r1", "lora-r4", "lora-r16", "lora-r64"]  # (b) keeps the recipe's arms
    assert not is_recipe(results, results["arms"]["lora-r16-mb4"])
    old = {**results, "arms": {name: {k: v for k, v in arm.items() if k not in ("alpha", "micro_batch")}
                               for name, arm in results["arms"].items() if name in ("lora-r16", "full")}}
    assert more.has_more(results) and not more.has_more(old)  # results without (i)'s arms: no section


def test_lr_times_alpha_ratio():
    # optimal lrs 4e-3 at alpha 8 and 2.5e-4 at alpha 128: lr x alpha 0.032 both, the ratio 1
    found = more.lr_times_alpha_ratio(Estimate(16.0, 8.0, 32.0), 8.0, 128.0)
    assert (found.value, found.low, found.high) == (1.0, 0.5, 2.0)
    assert more.ALPHA_LR.verdict(found.interval) == "reproduced"
    flat = more.lr_times_alpha_ratio(Estimate(1.0, 0.9, 1.1), 8.0, 128.0)  # an lr that ignores alpha
    assert more.ALPHA_LR.verdict(flat.interval) == "not reproduced"


def test_step_times():
    runs = [{"train_time_s": 3.0, "steps": 30}, {"train_time_s": 5.0, "steps": 50}, {"train_time_s": 1.0, "steps": 0}]
    assert np.array_equal(more.step_times(runs), np.array([[0.1], [0.1], [1.0]]))


def test_knowledge_rows_are_deterministic_random_facts():
    rows = capacity.knowledge_rows(5)
    assert rows == capacity.knowledge_rows(5) and rows != capacity.knowledge_rows(5, seed=1)
    assert len(rows) == 5 * len(capacity.ATTRIBUTES) and len({row["country"] for row in rows}) == 5
    assert all(row["completion"][1:] in capacity.CHOICES for row in rows) and len(capacity.CHOICES) > 100
    assert len({row["completion"] for row in rows}) > len(rows) // 2  # drawn at random, not one answer per country
    assert capacity.fact_bits(rows) == len(rows) * np.log2(len(capacity.CHOICES))
    decoys = capacity.decoy_rows(rows)
    assert [d["prompt"] for d in decoys] == [r["prompt"] for r in rows]
    assert all(d["completion"] != r["completion"] and d["completion"][1:] in capacity.CHOICES
               for d, r in zip(decoys, rows))
    passed = capacity.stream(rows, 3)
    assert len(passed) == 3 * len(rows) and all(passed.count(row) == 3 for row in rows) and passed[:len(rows)] != rows
