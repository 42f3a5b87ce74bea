"""`lorakit lab-report --quick`: the whole lab pipeline (searches, seeds, trade-off checkpoints, intruders, the
page) end to end on tiny settings, resumable, keeping the sections other experiments wrote into the page."""
from __future__ import annotations

import json
import re

import numpy as np

from lorakit.cli import main
from lorakit.lab import experiments
from lorakit.lab.claims import LR_RATIO, SFT
from lorakit.lab.evidence import VERDICTS, best_point, lattice_lr
from lorakit.lab.page import ALL_RUNS

OLD_PAGE = ("# old\n\n## (a) stale\n\nold numbers\n\n## (g) Reinforcement learning: kept\n\ng text\n\n"
            "## (h) Multimodal: kept\n\nh text\n\n## All runs\n\nold table\n")
VERDICT = re.compile(r"\*\*(" + "|".join(w[0].upper() + w[1:] for w in VERDICTS) + r")\.\*\*")
NUMBER = r"[-+]?\d[\d.]*%?x?"
INTERVAL = re.compile(rf"{NUMBER} \[{NUMBER}, {NUMBER}\]")


def _sections(page: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"## \((\w)\).*?(?=\n## |\Z)", page, re.S)}


def test_quick_lab_end_to_end(tmp_path, capsys):
    out, work = tmp_path / "docs", tmp_path / "work"
    out.mkdir()
    (out / "lab.md").write_text(OLD_PAGE, encoding="utf-8")
    assert main(["lab-report", "--quick", "--out", str(out), "--work", str(work)]) == 0
    results = json.loads((work / "quick" / experiments.RESULTS_FILE).read_text())
    settings = experiments.QUICK
    validation = {row["country"] for row in results["questions"]["validation"]}
    assert validation and not validation & {row["country"] for row in results["questions"]["test"]}
    for name, arm in results["arms"].items():
        scored = {run["k"]: run["validation_loss"] for run in arm["grid"]}
        assert arm["best_k"] == best_point(scored)  # chosen on validation only
        for run in arm["grid"]:
            assert run["seed"] == 0 and run["lr"] == lattice_lr(run["k"])
            assert np.isclose(run["validation_loss"], np.mean(run["losses"]["validation"]))
        assert [run["seed"] for run in arm["finals"]] == (list(settings.seeds) if arm["finals"] else [])
        assert {run["k"] for run in arm["finals"]} <= {arm["best_k"]}
        assert all(len(run["correct"]["test"]) == len(results["questions"]["test"]) for run in arm["finals"])
        if arm["per_epoch"]:  # (e): the same lattice offsets around the best, a point per epoch
            ks = {run["k"] for run in arm["grid"] if run.get("epochs")}
            assert {arm["best_k"] + offset for offset in settings.tradeoff} <= ks
            assert all(len(run["epochs"]) == settings.epochs for run in arm["grid"] if run.get("epochs"))
    for name in experiments.INTRUDER_ARMS:  # (f): every run's intruders, the finals' causal test
        arm = results["arms"][name]
        assert all(len(run["intruders"]["cosines"]) == len(run["intruders"]["random_cosines"])
                   for run in arm["grid"] + arm["finals"])
        for run in arm["finals"]:
            before, after = run["causal"]["before"], run["causal"]["after"]
            assert len(before["general"]) == len(after["general"]) == results["rows"]["general"]
            if not any(c < run["causal"]["eps"] for c in run["intruders"]["cosines"]):
                assert before == after  # nothing to scale: the same model, the same scores
    params = {name: arm["grid"][0]["trainable_params"] for name, arm in results["arms"].items()}
    attention = next(name for name in params if name.startswith("attention"))
    assert params[attention] == params["lora-r16"]  # (d) matched trainable counts
    more = experiments.more_arms(settings)  # (i): each arm searched in its own folders, the alpha arm search only
    assert set(more) <= set(results["arms"]) and any(not arm.finals for arm in more.values())
    for name, arm in more.items():
        assert all(run["folder"].endswith(arm.variant) for run in results["arms"][name]["grid"])
        assert bool(results["arms"][name]["finals"]) == arm.finals
    assert params["dora-r16"] > params["lora-r16"] == params["qlora-r16"]
    capacity = results["capacity"]  # (j): every rank's lr search, then every final seed at its best, one pass
    assert sorted(capacity["runs"]) == sorted(capacity["grids"]) == sorted(f"lora-r{r}" for r in settings.ranks)
    for name, runs in capacity["runs"].items():
        grid = {run["k"]: np.mean(run["facts"]) for run in capacity["grids"][name]}
        assert capacity["search"][name]["best_k"] == best_point(grid) and len(grid) >= 3  # both neighbours run
        assert [run["seed"] for run in runs] == list(settings.seeds) and len(runs[0]["facts"]) == capacity["facts"]
        assert all(run["k"] == best_point(grid) and run["steps"] == runs[0]["steps"] for run in runs)
    assert results["budget"]["distinct"] == (sum(len(a["grid"]) + len(a["finals"]) for a in results["arms"].values())
                                             + sum(len(runs) + len(capacity["grids"][name])
                                                   for name, runs in capacity["runs"].items()))

    page = (out / "lab.md").read_text(encoding="utf-8")
    sections = _sections(page)
    assert "stale" not in page and "old table" not in page
    assert sections["g"].strip() == "## (g) Reinforcement learning: kept\n\ng text"  # others' sections kept
    assert sections["h"].strip() == "## (h) Multimodal: kept\n\nh text"
    assert page.index("## (f)") < page.index("## (g)") < page.index("## (h)") < page.index(ALL_RUNS)
    assert f"Run budget: {results['budget']['distinct']} runs" in page
    assert page.index("## (h)") < page.index("## (i)") < page.index("## (j)") < page.index(ALL_RUNS)
    for letter in "abcdefij":
        text = sections[letter]
        rules = text.index("**Rules, fixed before the runs:**")
        assert rules < text.index("\n|") and rules < VERDICT.search(text).start(), letter  # rules before numbers
        assert INTERVAL.search(text), letter
    assert SFT.describe("x", lambda v: f"{100 * v:.1f}%").split("x. ")[1] in sections["a"]  # the code's own rule
    assert "Reproduced** when it lies within [5.00x, 20.00x]" in sections["c"] and LR_RATIO.low == 5.0
    for claim in ("DoRA matches or beats LoRA", "QLoRA matches LoRA", "Optimal lr scales as 1/alpha",
                  "LoRA is less tolerant of large batches"):
        line = next(line for line in sections["i"].splitlines() if claim in line and line.startswith("**"))
        assert VERDICT.match(line) and INTERVAL.search(line), claim
    assert "not representative of GPU speed" in sections["i"] and "Not tested:" in sections["i"]
    assert "causal test" in sections["f"] and "before -> after" in sections["f"]
    low_params = min(runs[0]["trainable_params"] for runs in capacity["runs"].values())
    claim = "The low rank runs out of capacity" if capacity["bits"] > low_params else "Below capacity, ranks learn alike"
    assert any(VERDICT.match(line) and claim in line for line in sections["j"].splitlines())  # the sizes' half
    assert "*Capacity binds:*" in sections["j"] and "*Ranks alike:*" in sections["j"]
    assert ("was not reached" in sections["j"]) == (capacity["bits"] <= low_params)
    for name in ("rank_curves", "lr_sweep", "target_sets", "forgetting", "intruders", "capacity_curves"):
        assert (out / f"lab_{name}.png").is_file(), name

    capsys.readouterr()  # resumable: a second call trains nothing and writes the same page
    assert main(["lab-report", "--quick", "--out", str(out), "--work", str(work)]) == 0
    assert "done " not in capsys.readouterr().out
    assert (out / "lab.md").read_text(encoding="utf-8") == page

    # --all: lab-rl's and lab-vision's experiments too, the whole page from one command; (a)-(f) are not retrained
    assert main(["lab-report", "--quick", "--all", "--out", str(out), "--work", str(work)]) == 0
    full = (out / "lab.md").read_text(encoding="utf-8")
    regenerated = _sections(full)
    assert "kept" not in regenerated["g"] and "kept" not in regenerated["h"]
    assert (work / "rl-quick" / "results.json").is_file() and (work / "vision-quick" / "results.json").is_file()
    assert all(regenerated[letter] == sections[letter] for letter in "abcdefij")
    assert list(regenerated) == sorted(regenerated)
