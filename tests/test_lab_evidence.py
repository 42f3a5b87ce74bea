"""lab/evidence.py: verdict rules on handmade intervals, bootstrap intervals on handmade marks, the learning-rate
search's proposals on handmade scores, the parabola fit, the run budget and the held-out split."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.lab import evidence
from lorakit.lab.datasets import read_jsonl
from lorakit.lab.evidence import LRSearch, Rule, bootstrap, fit_optimum, lattice_lr, next_points
from lorakit.models import EMBEDDED_DATASETS


@pytest.mark.parametrize(("rule", "interval", "word"), [
    (Rule("above", low=0.0), (0.1, 0.3), "reproduced"),
    (Rule("above", low=0.0), (-0.3, -0.1), "not reproduced"),
    (Rule("above", low=0.0), (-0.1, 0.3), "inconclusive"),
    (Rule("above", low=0.0), (0.0, 0.3), "inconclusive"),   # touching the threshold does not separate
    (Rule("below", high=1.0), (0.5, 0.9), "reproduced"),
    (Rule("below", high=1.0), (1.1, 2.0), "not reproduced"),
    (Rule("below", high=1.0), (0.9, 1.1), "inconclusive"),
    (Rule("within", low=5, high=20), (6, 19), "reproduced"),
    (Rule("within", low=5, high=20), (1, 4), "not reproduced"),
    (Rule("within", low=5, high=20), (21, 40), "not reproduced"),
    (Rule("within", low=5, high=20), (3, 8), "inconclusive"),
    (Rule("within", low=-0.05, high=0.05, refute_below=0.0), (0.06, 0.2), "inconclusive"),  # above: not refuted
    (Rule("within", low=-0.05, high=0.05, refute_below=0.0), (-0.06, -0.01), "not reproduced"),
])
def test_rule_verdicts(rule, interval, word):
    assert rule.verdict(interval) == word == evidence.verdict(interval, rule)


def test_rule_text_states_the_numbers_the_verdict_uses():
    text = Rule("within", low=5.0, high=20.0).describe("the ratio", "{:g}x".format)
    assert "the ratio" in text and "[5x, 20x]" in text and "**Reproduced**" in text and "**inconclusive**" in text
    assert "wholly above 0.5" in Rule("above", low=0.5).describe("a gain")
    assert "wholly below 0" in Rule("within", -0.1, 0.1, refute_below=0.0).describe("a difference")
    with pytest.raises(ValueError, match="above, below or within"):
        Rule("equal")


def test_bootstrap_pairs_items_across_arms_and_resamples_seeds_per_arm():
    rng = np.random.default_rng(3)
    marks = rng.random((3, 50))
    same = bootstrap({"a": marks[:1], "b": marks[:1].copy()}, lambda m: m["a"] - m["b"], 200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)  # one seed, paired items: no spread at all
    apart = bootstrap({"a": marks[:1], "b": marks[:1].copy()}, lambda m: m["a"] - m["b"], 200,
                      groups={"a": "x", "b": "y"})  # unpaired: the items are drawn separately
    assert apart.low < 0 < apart.high
    ratio = bootstrap({"a": marks + 1, "b": marks + 1}, lambda m: m["a"] / m["b"], 200)
    assert ratio.value == 1.0 and ratio.low < 1.0 < ratio.high  # seeds drawn per arm
    with pytest.raises(ValueError, match="has 40 items"):
        bootstrap({"a": marks, "b": marks[:, :40]}, lambda m: m["a"], 10)


def test_lr_search_extends_past_an_edge_then_refines():
    search = LRSearch(coarse=(-2, 0, 2), cap=5)
    loss = lambda k: (k - 3.3) ** 2  # noqa: E731  the optimum beyond the coarse grid's top edge
    scored: dict[int, float] = {}
    rounds = []
    while True:
        todo, state = next_points(search, scored)
        if not todo:
            break
        rounds.append(todo)
        scored.update({k: loss(k) for k in todo})
    assert rounds == [[-2, 0, 2], [4], [6], [3, 5]] and state == "done"  # 4 was an edge until 6 ran
    fitted, at_edge = fit_optimum(scored)
    assert not at_edge and fitted == pytest.approx(3.3)  # an exact parabola is fitted exactly
    assert lattice_lr(fitted) == pytest.approx(1e-3 * 2 ** 3.3)


def test_lr_search_stops_at_the_cap_with_the_best_at_an_edge():
    search = LRSearch(coarse=(0, 2), cap=3)
    scored = {0: 3.0, 2: 2.0}
    assert next_points(search, scored) == ([4], "run")
    scored[4] = 1.0
    assert next_points(search, scored) == ([], "capped")
    assert fit_optimum(scored) == (4.0, True)


def test_fit_optimum_with_unequal_neighbours():
    scored = {k: (k - 0.5) ** 2 for k in (-2, 0, 1)}  # neighbours at distance 2 and 1
    assert fit_optimum(scored)[0] == pytest.approx(0.5)
    assert fit_optimum({0: 1.0, 1: 0.0, 2: 1.0}) == (1.0, False)  # symmetric: the middle point


def test_budget_counts_each_experiments_runs_and_the_distinct_total():
    budget = evidence.Budget()
    for experiment, run in (("b", "seed0/x"), ("c", "seed0/x"), ("b", "seed0/y"), ("b", "seed0/y")):
        budget.use(experiment, run)
    assert budget.counts() == {"b": 2, "c": 1} and budget.distinct == 2


def test_split_is_by_country_and_fixed():
    rows = read_jsonl(EMBEDDED_DATASETS["embedded-eval"])
    split = evidence.split_held_out(rows, 22)
    countries = {name: {row["country"] for row in found} for name, found in split.items()}
    assert len(countries["validation"]) == 22 and not countries["validation"] & countries["test"]
    assert len(split["validation"]) + len(split["test"]) == len(rows)
    assert evidence.split_held_out(rows, 22) == split
    assert len({row["country"] for row in evidence.split_held_out(rows, 3, 5)["test"]}) == 5
    assert math.isclose(evidence.LEVEL, 0.95)
