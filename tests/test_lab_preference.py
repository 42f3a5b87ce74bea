"""The embedded preference set: right answers chosen, plausible wrong ones rejected, split as the SFT set is."""
from __future__ import annotations

import pytest
import torch
from _tol import tol

from lorakit.data import DataConfig, tokenize_rows
from lorakit.data.preference import tokenize_preference_rows
from lorakit.lab.datasets import QUESTIONS, answer, read_jsonl, split_countries
from lorakit.lab.facts import CONTINENTS, COUNTRIES, country
from lorakit.lab.preference import (NEIGHBOURS, PREFERENCE_FILES, WRONG_FORMAT_SHARE, margins, measure_preferences,
                                    preference_sets)
from lorakit.models import EMBEDDED_DATASETS, load_model, load_tokenizer


@pytest.fixture(scope="module")
def sets():
    return preference_sets(seed=0)


def test_shipped_files_are_the_generators_output(sets):
    assert read_jsonl(EMBEDDED_DATASETS["embedded-pref-train"]) == sets["pref_train.jsonl"]
    assert read_jsonl(EMBEDDED_DATASETS["embedded-pref-eval"]) == sets["pref_eval.jsonl"]
    assert list(sets) == list(PREFERENCE_FILES)
    assert preference_sets(seed=0) == sets and preference_sets(seed=1) != sets


def test_chosen_is_the_right_answer_and_rejected_a_plausible_wrong_one(sets):
    rows = sets["pref_train.jsonl"] + sets["pref_eval.jsonl"]
    for row in rows:
        facts = country(row["country"])
        right = answer(facts, row["kind"])
        assert row["chosen"] == " " + right and row["rejected"] != row["chosen"]
        rejected = row["rejected"].removeprefix(" ")
        if row["rejected_kind"] == "wrong_format":  # the right fact, in a sentence
            assert right in rejected and rejected.endswith(".") and rejected != right
        elif row["kind"] == "capital":  # another capital on the same continent
            [other] = [c for c in COUNTRIES if c.capital == rejected]
            assert other.continent == facts.continent and other != facts
        elif row["kind"] == "continent":
            assert rejected in NEIGHBOURS[facts.continent]
        else:
            assert rejected != right and rejected in {c.currency for c in COUNTRIES}
    share = sum(row["rejected_kind"] == "wrong_format" for row in rows) / len(rows)
    assert abs(share - WRONG_FORMAT_SHARE) < 0.05
    assert set(NEIGHBOURS) == set(CONTINENTS)


def test_splits_are_the_sft_sets_countries_and_questions(sets):
    train, held_out = split_countries(seed=0)
    pref_train, pref_eval = sets["pref_train.jsonl"], sets["pref_eval.jsonl"]
    assert {r["country"] for r in pref_train} == {c.name for c in train}
    assert {r["country"] for r in pref_eval} == {c.name for c in held_out}
    assert not {r["country"] for r in pref_train} & {r["country"] for r in pref_eval}
    sft_eval = read_jsonl(EMBEDDED_DATASETS["embedded-eval"])
    assert [(r["prompt"], r["chosen"]) for r in pref_eval] == [(r["prompt"], r["completion"]) for r in sft_eval]
    assert len(pref_train) == 2 * len(QUESTIONS) * len(train)  # two phrasings of each kind, as the SFT rows
    for row in pref_train:
        asked = [f"Question: {q.format(c=row['country'])}\nAnswer:" for q in QUESTIONS[row["kind"]]]
        assert row["prompt"] in asked


def test_the_chosen_side_is_the_sft_example_of_the_same_question():
    tok = load_tokenizer("embedded")
    rows = read_jsonl(EMBEDDED_DATASETS["embedded-pref-eval"])[:8]
    pairs, stats = tokenize_preference_rows(rows, tok, DataConfig())
    sft, _ = tokenize_rows([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows], tok,
                           DataConfig(format="prompt_completion"))
    assert [pair["chosen"] for pair in pairs] == sft and stats.n_examples == 8


def test_margin_is_the_difference_of_the_answers_summed_log_probs():
    tok, model = load_tokenizer("embedded"), load_model("embedded")
    rows = read_jsonl(EMBEDDED_DATASETS["embedded-pref-eval"])[:3]
    found = margins(model, tok, rows)

    def log_prob(prompt: str, completion: str) -> float:
        prompt_ids = tok(prompt)["input_ids"]
        ids = prompt_ids + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        scores = logits.log_softmax(-1)
        return sum(scores[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))

    expected = [log_prob(r["prompt"], r["chosen"]) - log_prob(r["prompt"], r["rejected"]) for r in rows]
    # padded batch vs one row: the same sums in another order; log-softmax over the 2048-token vocabulary
    bound = tol(torch.float32, reduction=2048, scale=max(abs(value) for value in expected))
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), **bound)


def test_measure_preferences_reports_accuracy_margins_and_forgetting():
    tok, model = load_tokenizer("embedded"), load_model("embedded")
    rows = read_jsonl(EMBEDDED_DATASETS["embedded-pref-eval"])[:12]
    general = read_jsonl(EMBEDDED_DATASETS["embedded-general"])[:4]
    scores = measure_preferences(model, tok, rows, general)
    assert set(scores["accuracy"]) >= {"all", "capital"} and 0 <= scores["accuracy"]["all"] <= 1
    assert len(scores["predictions"]) == 12 and scores["general_loss"] > 0
    assert scores["margin"] == pytest.approx(sum(margins(model, tok, rows)) / 12)
    assert set(scores["margin_by_rejected"]) <= {"wrong_fact", "wrong_format"}
    assert 0 <= scores["chosen_likelier"] <= 1


def test_quickstart_dpo_recipe_is_the_run_lorakit_quickstart_dpo_makes():
    """configs/quickstart-dpo.yaml and `lorakit quickstart --dpo` train DPO with the same settings."""
    import argparse
    import dataclasses
    from pathlib import Path

    from lorakit.commands import quickstart as command
    from lorakit.config import config_to_dict, load_config
    from lorakit.lab import quickstart
    from lorakit.run import resolve_embedded_data

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    lab = quickstart.dpo_config(parser.parse_args(["--dpo"]), Path("runs/quickstart"), Path("runs/quickstart/adapter"))
    recipe = load_config("quickstart-dpo")
    recipe = dataclasses.replace(recipe, data=resolve_embedded_data(recipe.data), name="dpo",
                                 output_dir="runs/quickstart", train=dataclasses.replace(recipe.train, progress="auto"))
    assert config_to_dict(recipe) == config_to_dict(lab)


def test_short_quickstart_with_dpo_reports_sft_against_sft_plus_dpo(tmp_path, capsys):
    import json

    from lorakit.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--steps", "10", "--dpo", "--dpo-steps", "4", "--progress",
                 "none"]) == 0
    printed = capsys.readouterr().out
    assert "SFT then DPO (beta 0.1), on 198 held-out preference pairs" in printed
    assert "pre-flight: one training pair" in printed
    report = json.loads((out / "report.json").read_text())
    dpo = report["dpo"]
    assert dpo["training"]["steps"] == 4 and dpo["pairs"]["eval"] == 198
    for side in ("sft", "dpo"):
        assert set(dpo[side]) == {"accuracy", "margin", "margin_by_rejected", "chosen_likelier", "general_loss"}
    assert dpo["dpo"]["margin"] != dpo["sft"]["margin"]  # four steps moved the adapter
    assert (out / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert f"init_adapter: {out / 'adapter'}" in (out / "dpo" / "config.yaml").read_text()
    assert "## SFT then DPO" in (out / "report.md").read_text()
