"""How the lab turns runs into verdicts: splits, bootstrap intervals, rules, learning-rate grids, run budgets.

Every experiment of docs/lab.md (sections (a)-(g)) goes through these few pieces, so one rule reads the same in
every section:

    split      the held-out countries, split by country into validation (chooses learning rates) and test
               (reports), `split_held_out`
    intervals  `bootstrap`: 95% percentile intervals of any statistic of per-arm means, questions (or documents)
               resampled once for all arms that share them (paired), seeds resampled per arm
    verdicts   `Rule` + `verdict`: "reproduced" only when the interval separates in the claimed direction (or lies
               inside the claimed band), "not reproduced" when it separates the other way, "inconclusive" otherwise;
               `Rule.describe` writes the rule for the page from the same numbers the code uses
    lr grids   a lattice lr = LR_UNIT * 2**k: a coarse grid (every other point) at one seed, extended while the best
               point sits at an edge (up to a cap: `LRSearch`, `next_points`), refined around the best point, the
               optimum fitted as a parabola in log-lr (`fit_optimum`)
    budget     `Budget`: how many runs each experiment used, for the page

numpy only: no torch, no model, so the rules are tested on handmade numbers.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
LEVEL = 0.95  # the intervals' coverage
RESAMPLES = 2000
SPLIT_SEED = "lorakit-rl-split"  # the held-out split's shuffle (named for the experiment that introduced it)


# --- splits -------------------------------------------------------------------------------------------------------

def split_held_out(rows: Sequence[dict], validation_countries: int, test_countries: int | None = None
                   ) -> dict[str, list[dict]]:
    """{"validation": rows, "test": rows}: the held-out rows split by country (a fixed shuffle); `test_countries`
    None: every country not in validation."""
    countries = sorted({row["country"] for row in rows})
    random.Random(SPLIT_SEED).shuffle(countries)
    validation = set(countries[:validation_countries])
    rest = countries[validation_countries:]
    test = set(rest if test_countries is None else rest[:test_countries])
    return {"validation": [row for row in rows if row["country"] in validation],
            "test": [row for row in rows if row["country"] in test]}


# --- intervals ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A statistic on all the data and its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high

    def as_dict(self) -> dict:
        return {"mean": self.value, "interval": [self.low, self.high]}


Statistic = Callable[[Mapping[str, float]], float]


def bootstrap(arms: Mapping[str, np.ndarray], statistic: Statistic, resamples: int = RESAMPLES, seed: int = 0,
              groups: Mapping[str, str] | None = None) -> Estimate:
    """`statistic` of the arms' means, and its 95% percentile interval.

    arms: name -> (seeds x items) marks (0/1 accuracy, per-item losses, ...). Each resample draws the items of each
    group once, shared by every arm of that group (paired: the same questions for both arms of a difference), then
    each arm's seeds independently; `groups` maps an arm to its item group (default: one group for all arms, which
    then need the same number of items). `statistic` maps {arm: mean} to a number."""
    groups = dict(groups or {name: "items" for name in arms})
    sizes: dict[str, int] = {}
    for name, marks in arms.items():
        size = sizes.setdefault(groups[name], marks.shape[1])
        if size != marks.shape[1]:
            raise ValueError(f"arm {name!r} has {marks.shape[1]} items, its group {groups[name]!r} {size}")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for b in range(resamples):
        items = {group: rng.integers(0, size, size) for group, size in sizes.items()}
        means = {name: marks[rng.integers(0, len(marks), len(marks))][:, items[groups[name]]].mean()
                 for name, marks in arms.items()}
        values[b] = statistic(means)
    value = statistic({name: marks.mean() for name, marks in arms.items()})
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high))


def bootstrap_accuracy(marks: np.ndarray, other: np.ndarray | None, resamples: int, seed: int = 0
                       ) -> tuple[float, tuple[float, float]]:
    """(mean, 95% interval) of the mean of `marks` (seeds x questions), or of its difference to `other` (the same
    questions, paired)."""
    if other is None:
        found = bootstrap({"a": marks}, lambda m: m["a"], resamples, seed)
    else:
        found = bootstrap({"a": marks, "b": other}, lambda m: m["a"] - m["b"], resamples, seed)
    return found.value, found.interval


# --- rules and verdicts -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """How the 95% interval of one quantity decides a claim.

    above   the claim: quantity > `low`. Reproduced when the interval lies wholly above `low`, not reproduced when
            wholly below it.
    below   the claim: quantity < `high`; the mirror image.
    within  the claim: `low` <= quantity <= `high` (a match within a margin). Reproduced when the interval lies
            inside the band; not reproduced when it lies wholly outside it, or, with `refute_below`, only when it lies
            wholly below that (a match claim refuted only by being clearly worse).
    """

    kind: str
    low: float = -math.inf
    high: float = math.inf
    refute_below: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("above", "below", "within"):
            raise ValueError(f"rule kind must be above, below or within, got {self.kind!r}")

    def verdict(self, interval: tuple[float, float]) -> str:
        """One of VERDICTS for a (low, high) interval."""
        lo, hi = interval
        if self.kind == "above":
            return VERDICTS[0] if lo > self.low else VERDICTS[1] if hi < self.low else VERDICTS[2]
        if self.kind == "below":
            return VERDICTS[0] if hi < self.high else VERDICTS[1] if lo > self.high else VERDICTS[2]
        if self.low <= lo and hi <= self.high:
            return VERDICTS[0]
        if self.refute_below is not None:
            return VERDICTS[1] if hi < self.refute_below else VERDICTS[2]
        return VERDICTS[1] if hi < self.low or lo > self.high else VERDICTS[2]

    def describe(self, quantity: str, fmt: Callable[[float], str] = "{:g}".format) -> str:
        """The rule in words, from the same numbers `verdict` uses."""
        head = f"Take the {LEVEL:.0%} bootstrap interval of {quantity}. "
        if self.kind == "above":
            return head + (f"**Reproduced** when it lies wholly above {fmt(self.low)}; **not reproduced** when "
                           "wholly below it; **inconclusive** otherwise.")
        if self.kind == "below":
            return head + (f"**Reproduced** when it lies wholly below {fmt(self.high)}; **not reproduced** when "
                           "wholly above it; **inconclusive** otherwise.")
        refuted = (f"wholly below {fmt(self.refute_below)}" if self.refute_below is not None
                   else "wholly outside that band")
        return head + (f"**Reproduced** when it lies within [{fmt(self.low)}, {fmt(self.high)}]; **not "
                       f"reproduced** when it lies {refuted}; **inconclusive** otherwise.")


def verdict(interval: tuple[float, float], rule: Rule) -> str:
    """`rule.verdict(interval)`."""
    return rule.verdict(interval)


def pct(value: float) -> str:
    """A fraction as the page prints it: '12.3%'."""
    return f"{100 * value:.1f}%"


def verdict_word(word: str) -> str:
    """The verdict as the page prints it: '**Reproduced.**'."""
    return f"**{word[0].upper()}{word[1:]}.**"


# --- learning-rate grids ------------------------------------------------------------------------------------------

LR_UNIT = 1e-3  # lattice point k is LR_UNIT * 2**k


def lattice_lr(k: int | float) -> float:
    """The learning rate at lattice point k (a float k: between grid points, e.g. a fitted optimum)."""
    return LR_UNIT * 2.0 ** k


@dataclass(frozen=True)
class LRSearch:
    """A learning-rate search on the 2x lattice: `coarse` exponents first (every other lattice point), then one
    coarse step further out while the best point sits at an edge, at most until the grid holds `cap` points (a
    search stopped there is "capped": its optimum may lie beyond), then both neighbours of the best point."""

    coarse: tuple[int, ...]
    cap: int = 9

    @property
    def step(self) -> int:
        ks = sorted(self.coarse)
        return ks[1] - ks[0] if len(ks) > 1 else 2


def best_point(scored: Mapping[int, float]) -> int:
    """The exponent with the lowest score (ties: the smaller learning rate)."""
    return min(scored, key=lambda k: (scored[k], k))


def next_points(search: LRSearch, scored: Mapping[int, float]) -> tuple[list[int], str]:
    """(exponents to run next, state): state "run" (run those, then call again), "done", or "capped" (the best
    point sits at an edge of a grid of `cap` points)."""
    missing = [k for k in search.coarse if k not in scored]
    if missing:
        return missing, "run"
    best, ks = best_point(scored), sorted(scored)
    if best in (ks[0], ks[-1]) and len(ks) > 1:
        if len(ks) >= search.cap:
            return [], "capped"
        return [best - search.step if best == ks[0] else best + search.step], "run"
    refine = [k for k in (best - 1, best + 1) if k not in scored]
    return (refine, "run") if refine else ([], "done")


def fit_optimum(scored: Mapping[int, float]) -> tuple[float, bool]:
    """(fitted optimum exponent, at_edge): the vertex of the parabola through the best point and its nearest
    neighbour on each side (in log2-lr), kept between those neighbours; at an edge, the edge point itself."""
    best, ks = best_point(scored), sorted(scored)
    i = ks.index(best)
    if i == 0 or i == len(ks) - 1:
        return float(best), True
    (x0, y0), (x1, y1), (x2, y2) = [(ks[j], scored[ks[j]]) for j in (i - 1, i, i + 1)]
    # vertex of the parabola through three points (x0 < x1 < x2)
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return float(best), False
    return float(min(max(x1 - 0.5 * num / den, x0), x2)), False


# --- run budget ---------------------------------------------------------------------------------------------------

@dataclass
class Budget:
    """Which runs (by folder) each experiment used; a run shared by two experiments counts in both."""

    runs: dict[str, set[str]] = field(default_factory=dict)

    def use(self, experiment: str, run: str) -> None:
        self.runs.setdefault(experiment, set()).add(run)

    def counts(self) -> dict[str, int]:
        return {name: len(found) for name, found in self.runs.items()}

    @property
    def distinct(self) -> int:
        """Runs in all, each counted once."""
        return len(set().union(*self.runs.values())) if self.runs else 0
