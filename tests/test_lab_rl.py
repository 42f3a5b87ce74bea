"""The lab's RL experiment (lab/rl.py, lab/rl_page.py, `lorakit lab-rl`): the verdict rule on handmade
intervals, the bootstrap on handmade marks, the lr choice, and the quick pipeline end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from lorakit.cli import main
from lorakit.lab import rl
from lorakit.lab.datasets import read_jsonl
from lorakit.lab.rl_page import FIGURE, HEADING
from lorakit.models import EMBEDDED_DATASETS


@pytest.mark.parametrize(("interval", "word"), [
    ((-0.03, 0.04), "reproduced"),
    ((-0.05, 0.05), "reproduced"),          # the margin's ends are inside
    ((-0.20, -0.08), "not reproduced"),     # wholly below 0 and beyond the margin
    ((-0.06, -0.01), "not reproduced"),     # wholly below 0, not within the margin
    ((-0.04, -0.01), "reproduced"),         # below 0 but within the margin: matches
    ((-0.10, 0.02), "inconclusive"),        # too wide
    ((0.06, 0.20), "inconclusive"),         # rank 1 above full by more than the margin
    ((-0.02, 0.07), "inconclusive"),
])
def test_verdict_maps_intervals_to_the_three_words(interval, word):
    assert rl.verdict(interval) == word


def test_verdict_uses_the_margin_given():
    assert rl.verdict((-0.08, 0.08), margin=0.1) == "reproduced"
    assert rl.verdict((-0.08, 0.08), margin=0.05) == "inconclusive"


def test_bootstrap_of_identical_arms_is_zero_and_of_opposite_arms_is_one():
    rng = np.random.default_rng(1)
    marks = (rng.random((3, 40)) < 0.5).astype(float)
    # one seed each: the questions are resampled once for both arms (paired), so every resample differs by 0
    assert rl.bootstrap_accuracy(marks[:1], marks[:1].copy(), 300) == (0.0, (0.0, 0.0))
    mean, (low, high) = rl.bootstrap_accuracy(marks, marks.copy(), 300)  # seeds resampled per arm: some spread
    assert mean == 0.0 and low < 0.0 < high
    ones, zeros = np.ones((3, 40)), np.zeros((3, 40))
    assert rl.bootstrap_accuracy(ones, zeros, 50) == (1.0, (1.0, 1.0))
    mean, (low, high) = rl.bootstrap_accuracy(marks, None, 300)
    assert mean == marks.mean() and low < mean < high


def test_choose_lr_takes_the_best_validation_accuracy_and_the_smaller_lr_on_ties():
    sweep = [{"lr": 1e-4, "validation_accuracy": 0.4}, {"lr": 3e-4, "validation_accuracy": 0.6},
             {"lr": 1e-3, "validation_accuracy": 0.6}]
    assert rl.choose_lr(sweep) == 3e-4
    assert rl.choose_lr(sweep[:1]) == 1e-4


def test_full_split_is_disjoint_by_country_and_covers_the_held_out_set():
    rows = read_jsonl(EMBEDDED_DATASETS["embedded-eval"])
    splits = rl.split_held_out(rows, rl.FULL)
    countries = {name: {row["country"] for row in found} for name, found in splits.items()}
    assert not countries["validation"] & countries["test"]
    assert len(countries["validation"]) == rl.FULL.validation_countries
    assert len(splits["validation"]) + len(splits["test"]) == len(rows)


def _val_source(cell_dir):
    return yaml.safe_load((cell_dir / "config.yaml").read_text())["data"]["val_source"]


def test_quick_pipeline_end_to_end(tmp_path):
    out, work = tmp_path / "docs", tmp_path / "work"
    (out).mkdir()
    (out / "lab.md").write_text("# lab\n\n## (a) one\n\ntext\n\n## All runs\n\ntable\n", encoding="utf-8")
    assert main(["lab-rl", "--quick", "--out", str(out), "--work", str(work)]) == 0
    folder = work / "rl-quick"
    results = json.loads((folder / rl.RESULTS_FILE).read_text())
    settings = rl.QUICK
    countries = {name: set(found) for name, found in results["splits"].items()}
    assert not countries["validation"] & countries["test"]
    for arm, sweep in results["sweep"].items():
        assert [row["lr"] for row in sweep] == list(settings.lr_grid[arm])
        assert results["chosen_lr"][arm] == rl.choose_lr(sweep)
        for row in sweep:  # the lr choice saw the validation split only
            cell_dir = folder / "sweep" / row["name"]
            assert _val_source(cell_dir) == str(folder / rl.SPLIT_FILES["validation"])
            assert {r["country"] for r in read_jsonl(cell_dir / "predictions.jsonl")} == countries["validation"]
            assert [step for step, _ in row["validation_curve"]] == [1, 2]
    for arm, found in results["arms"].items():
        assert found["lr"] == results["chosen_lr"][arm]
        assert [run["seed"] for run in found["runs"]] == list(settings.seeds)
        for run in found["runs"]:
            cell_dir = folder / f"seed{run['seed']}" / run["name"]
            assert _val_source(cell_dir) == str(folder / rl.SPLIT_FILES["test"])
            assert {key.split("/")[0] for key in run["correct"]} == countries["test"]
            assert len(run["correct"]) == results["questions"]["test"]
            assert run["test_accuracy"] == sum(run["correct"].values()) / len(run["correct"])
            assert [step for step, _ in run["test_curve"]] == [1, 2]
        low, high = results["accuracy"][arm]["interval"]
        assert low <= results["accuracy"][arm]["mean"] <= high
    assert set(results["minus_full"]) == {"lora-r1", "lora-r8"}
    assert results["verdict"] == rl.verdict(results["minus_full"]["lora-r1"]["interval"])
    page = (out / "lab.md").read_text(encoding="utf-8")
    assert page.index("## (a) one") < page.index(HEADING) < page.index("## All runs")
    assert (out / FIGURE).is_file()
    assert page.index("**Rule, fixed before the runs**") < page.index("| arm | trainable params")
    # resumable: a second call trains nothing and gives the same results, and (g) is replaced, not repeated
    assert main(["lab-rl", "--quick", "--out", str(out), "--work", str(work)]) == 0
    assert json.loads((folder / rl.RESULTS_FILE).read_text()) == results
    assert (out / "lab.md").read_text(encoding="utf-8") == page
