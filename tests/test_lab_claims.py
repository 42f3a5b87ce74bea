"""docs/lab.md's verdicts on handmade results: computed from the runs by the stated rules, never typed in."""
from __future__ import annotations

import numpy as np
import pytest

from lorakit.cli import main
from lorakit.lab.claims import LR_RATIO, SAME_CURVE, claim_line, optimum_ratio, times
from lorakit.lab.forgetting import curve_gap
from lorakit.lab.page import lettered_sections


def _grid(centre: float, ks: list[int], rng: np.random.Generator, questions: int = 30) -> list[dict]:
    """Seed-0 grid runs whose validation loss per question is a parabola in k around `centre`, plus noise."""
    return [{"k": k, "losses": {"validation": list(1.0 + (k - centre) ** 2 + 0.01 * rng.random(questions))}}
            for k in ks]


def test_optimum_ratio_reads_the_fitted_optima():
    rng = np.random.default_rng(0)
    results = {"settings": {"bootstrap": 300},
               "arms": {"lora": {"grid": _grid(0.3, [-2, -1, 0, 1, 2], rng)},
                        "full": {"grid": _grid(-3.0, [-6, -4, -3, -2, 0], rng)}}}
    found = optimum_ratio(results, "lora", "full")
    assert found.value == pytest.approx(2 ** 3.3, rel=0.02)
    assert found.low <= found.value <= found.high and found.high / found.low < 1.1
    assert LR_RATIO.verdict(found.interval) == "reproduced"  # about 9.8x, inside [5, 20]


def _tradeoff(general_shift: float, rng: np.random.Generator) -> dict:
    """Two methods whose (test loss, general loss) points per epoch lie on one curve, LoRA's shifted up."""
    def runs(shift: float) -> list[dict]:
        out = []
        for k in (-1, 0, 1):
            epochs = [{"test": list(3.0 / (e + 1 + k + 2) + 0.01 * rng.random(40)),
                       "general": list(0.7 + 0.2 * e * (k + 2) / 3 + shift + 0.01 * rng.random(25))}
                      for e in range(4)]
            out.append({"k": k, "epochs": epochs})
        return out
    return {"settings": {"bootstrap": 300, "tradeoff": (-1, 0, 1)},
            "arms": {"lora": {"best_k": 0, "grid": runs(general_shift)}, "full": {"best_k": 0, "grid": runs(0.0)}}}


def test_curve_gap_is_zero_on_the_same_curve_and_the_shift_otherwise():
    rng = np.random.default_rng(1)
    same, levels = curve_gap(_tradeoff(0.0, np.random.default_rng(1)), "lora", "full")
    assert len(levels) == 5 and abs(same.value) < 0.01
    assert SAME_CURVE.verdict(same.interval) == "reproduced"
    shifted, _ = curve_gap(_tradeoff(0.2, rng), "lora", "full")
    assert shifted.value == pytest.approx(0.2, abs=0.02)
    assert SAME_CURVE.verdict(shifted.interval) == "not reproduced"


def test_claim_line_prints_the_verdict_and_the_interval():
    rng = np.random.default_rng(2)
    found = optimum_ratio({"settings": {"bootstrap": 100},
                           "arms": {"a": {"grid": _grid(0.0, [-1, 0, 1], rng)},
                                    "b": {"grid": _grid(0.0, [-1, 0, 1], rng)}}}, "a", "b")
    line = claim_line("a / b", found, LR_RATIO, times)
    assert line.startswith("**Not reproduced.** a / b: 1.00x [") and line.endswith("].")  # ratio 1, band [5, 20]
    assert claim_line("a / b", found, LR_RATIO, times, force="inconclusive").startswith("**Inconclusive.**")
    assert claim_line("a / b", None, LR_RATIO, times).startswith("**Inconclusive.** a / b: not measured")


def test_lettered_sections_are_found_by_heading():
    page = "# lab\n\nintro\n\n## (a) one\n\ntext a\n\n## (h) Multimodal\n\ntext h\n\n## All runs\n\ntable\n"
    assert lettered_sections(page) == {"a": "## (a) one\n\ntext a", "h": "## (h) Multimodal\n\ntext h"}


def test_lab_report_is_a_command(capsys):
    assert main(["lab-report", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--work" in out and "--quick" in out and "--rl" in out and "--workers" in out
