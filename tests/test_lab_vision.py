"""The lab's image experiment (section (h)) end to end on tiny settings, and the one way sections enter lab.md."""
from __future__ import annotations

import json

from lorakit.cli import main
from lorakit.lab.sections import put_section
from lorakit.lab.vision_page import HEADING, LORA_BUYS


def test_quick_lab_vision_writes_its_section_with_rules_before_numbers(tmp_path, capsys):
    out, work = tmp_path / "docs", tmp_path / "work"
    (out).mkdir()
    (out / "lab.md").write_text("# Lab\n\n## (a) first\n\ntext a\n\n## All runs\n\n| table |\n")
    assert main(["lab-vision", "--quick", "--out", str(out), "--work", str(work)]) == 0
    said = capsys.readouterr().out
    results = json.loads((work / "vision-quick" / "results.json").read_text())
    page = (out / "lab.md").read_text()
    # the section sits between (a) and the closing table, the rules before the table of numbers
    assert page.index("## (a) first") < page.index(HEADING) < page.index("## All runs")
    section = page[page.index(HEADING):page.index("## All runs")]
    assert section.index("**Rules, fixed before the runs.**") < section.index("| arm | trainable params |")
    assert ("routed minus projector-only accuracy on the composed questions of held-out countries (questions and "
            "seeds resampled). **Reproduced** when it lies wholly above +0 points; **not reproduced** when wholly "
            "below it; **inconclusive** otherwise.") in section
    verdict = LORA_BUYS.verdict(tuple(results["differences"]["routed_minus_projector_composed"]["interval"]))
    assert f"**{verdict[0].upper()}{verdict[1:]}.** Routed minus projector-only" in section
    # every arm reported, with intervals; text unchanged is measured, not assumed
    for arm in ("routed", "projector-only", "shared"):
        assert f"| {arm} | {results['arms'][arm]['runs'][0]['trainable_params']:,} |" in section
    assert results["routed_text_equal"] is True and "**Text unchanged: yes.**" in section
    assert "text unchanged: yes" in said
    assert (out / "lab_vision_examples.png").stat().st_size > 0
    assert json.loads((out / "lab_vision_results.json").read_text())["arms"].keys() == results["arms"].keys()
    # the projector-only arm trains no LoRA: fewer trainable numbers than the routed and shared arms
    params = {arm: found["runs"][0]["trainable_params"] for arm, found in results["arms"].items()}
    assert params["projector-only"] < params["routed"] == params["shared"]
    # a second run reads every run back and replaces the section instead of adding one
    assert main(["lab-vision", "--quick", "--out", str(out), "--work", str(work)]) == 0
    assert (out / "lab.md").read_text().count(HEADING) == 1


def test_put_section_replaces_inserts_before_the_table_or_appends(tmp_path):
    page = tmp_path / "lab.md"
    put_section(page, "## (x) one", "## (x) one\n\nfirst\n")
    assert page.read_text() == "## (x) one\n\nfirst\n"
    page.write_text("# Lab\n\n## (x) one\n\nfirst\n\n## (y) two\n\nkeep\n\n## All runs\n\nrows\n")
    put_section(page, "## (x) one", "## (x) one\n\nsecond\n")
    put_section(page, "## (z) three", "## (z) three\n\nnew\n")
    assert page.read_text() == ("# Lab\n\n## (x) one\n\nsecond\n\n## (y) two\n\nkeep\n\n## (z) three\n\nnew\n\n"
                                "## All runs\n\nrows\n")
