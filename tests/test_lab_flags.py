"""The multimodal lab's procedural flags: every flag is distinct, renderings vary, splits are clean."""
from __future__ import annotations

import itertools

import numpy as np

from lorakit.lab import flags
from lorakit.lab.facts import COUNTRIES


def _clean(name: str, height: int = 24) -> np.ndarray:
    flag = flags.FLAGS[name]
    colours = {key: np.asarray(value, np.float64) for key, value in flags._C.items()}
    return flags.draw(flag, height, int(round(height * 1.5)), colours)


def test_at_least_30_flags_all_in_the_fact_table():
    names = {row.name for row in COUNTRIES}
    assert len(flags.FLAGS) >= 30
    assert set(flags.FLAGS) <= names
    assert [row.name for row in flags.flag_countries()] == sorted(flags.FLAGS)


def test_no_two_flags_share_a_drawing():
    drawings = {name: _clean(name) for name in flags.FLAGS}
    for a, b in itertools.combinations(drawings, 2):
        # at least 10% of the pixels differ by a clear colour distance
        distance = np.abs(drawings[a] - drawings[b]).sum(-1)
        assert (distance > 60).mean() > 0.10, (a, b)


def test_renderings_are_seeded_and_vary():
    first = flags.render("Japan", seed=7)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, flags.render("Japan", seed=7))
    assert not np.array_equal(first, flags.render("Japan", seed=8))
    assert flags.render("Japan", seed=7, size=48).shape == (48, 48, 3)


def test_rows_split_composed_questions_and_never_reuse_a_rendering(tmp_path):
    sets = flags.build_flag_rows(tmp_path, seed=0, train_renderings=2, eval_renderings=1, size=16)
    split = flags.split_flags(0)
    assert set(split.composed_train).isdisjoint(split.composed_held_out)
    assert set(split.composed_train) | set(split.composed_held_out) == set(flags.FLAGS)
    images = {part: {row["images"][0] for key, rows in sets.items() if key.startswith(part) for row in rows}
              for part in ("train", "validation", "test")}
    assert images["train"].isdisjoint(images["validation"]) and images["train"].isdisjoint(images["test"])
    assert images["validation"].isdisjoint(images["test"])
    composed_trained = {row["country"] for row in sets["train"] if row["kind"] != "flag"}
    assert composed_trained == set(split.composed_train)
    assert {row["country"] for row in sets["test_composed"]} == set(split.composed_held_out)
    assert {row["country"] for row in sets["test_flag"]} == set(flags.FLAGS)
    row = next(row for row in sets["test_composed"] if row["kind"] == "capital")
    assert row["prompt"] == ("Question: <image>\nWhat is the capital of the country whose flag this is?"
                             "\nAnswer:")
    japan = next(row for row in sets["test_flag"] if row["country"] == "Japan")
    assert japan["completion"] == " Japan"
    netherlands = next(row for row in sets["test_flag"] if row["country"] == "the Netherlands")
    assert netherlands["completion"] == " The Netherlands"
