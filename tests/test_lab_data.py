"""The embedded lab's data: facts, corpus and the country split behind the instruction set."""
from __future__ import annotations

import pytest

from lorakit.lab.corpus import FORBIDDEN, build_corpus, corpus_sha256
from lorakit.lab.datasets import (SHOWCASE, eval_rows, general_rows, split_countries,
                                  train_rows)
from lorakit.lab.facts import COUNTRIES, CONTINENTS, country


def test_fact_table_is_clean():
    names = [c.name for c in COUNTRIES]
    assert len(names) == len(set(names)) >= 160
    for c in COUNTRIES:
        assert c.continent in CONTINENTS
        bare = c.name.lower().removeprefix("the ")
        # the answer must not be copyable from the question
        assert bare not in c.capital.lower() and c.capital.lower() not in bare, c
        assert not any(ch in c.capital + c.currency for ch in ",.'?"), c
    assert country("Netherlands").capital == "Amsterdam"
    assert country("Croatia").currency == "euro" and country("Bulgaria").currency == "euro"


def test_corpus_has_no_question_form_text():
    documents = build_corpus(3000, seed=7)
    text = "\n".join(documents)
    for word in FORBIDDEN:
        assert word not in text
    assert "what" not in text.lower().split()
    # every fact kind is present, in more than one phrasing
    assert "The capital of the Netherlands is Amsterdam." in text or \
        "Amsterdam is the capital of the Netherlands." in text
    assert text.count("Its capital") > 0 and text.count("uses the") > 0


def test_corpus_is_deterministic_and_seeded():
    assert corpus_sha256(build_corpus(200, 1)) == corpus_sha256(build_corpus(200, 1))
    assert corpus_sha256(build_corpus(200, 1)) != corpus_sha256(build_corpus(200, 2))


def test_train_and_heldout_countries_are_disjoint():
    train, held_out = split_countries(seed=0)
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(COUNTRIES)
    assert 0.55 < len(train) / len(COUNTRIES) < 0.65
    assert all(country(name) in held_out for name in SHOWCASE)
    asked_in_training = {row["country"] for row in train_rows(train)}
    asked_in_eval = {row["country"] for row in eval_rows(held_out)}
    assert not asked_in_training & asked_in_eval
    netherlands = [r for r in eval_rows(held_out) if r["country"] == "the Netherlands"]
    assert {"prompt": "Question: What is the capital of the Netherlands?\nAnswer:",
            "completion": " Amsterdam"}.items() <= netherlands[0].items()


@pytest.mark.parametrize("seed", [0, 3])
def test_training_rows_use_several_phrasings(seed):
    train, _ = split_countries(seed)
    rows = train_rows(train, seed)
    assert len(rows) == 6 * len(train)
    capital_questions = {r["prompt"].split(" ")[1] for r in rows if r["kind"] == "capital"}
    assert len(capital_questions) >= 3  # What / Which / Name ...
    assert all(r["completion"].startswith(" ") and r["prompt"].endswith("Answer:") for r in rows)


def test_general_text_is_fresh():
    corpus = build_corpus(500, seed=0)
    rows = general_rows(50, seed=99, exclude=corpus)
    assert len(rows) == 50
    assert not {r["text"] for r in rows} & set(corpus)


def test_chat_rows_and_prompt_completion_rows_teach_the_embedded_model_one_format():
    """The embedded chat template renders a Q/A turn to the same token ids and trained span as
    the prompt/completion row it came from, and separates turns with a newline."""
    from lorakit.data import DataConfig, tokenize_rows
    from lorakit.models import load_tokenizer

    tok = load_tokenizer("embedded")
    row = {"prompt": "Question: What is the capital of Peru?\nAnswer:", "completion": " Lima"}
    chat = {"messages": [{"role": "user", "content": "What is the capital of Peru?"},
                         {"role": "assistant", "content": "Lima"}]}
    plain, _ = tokenize_rows([row], tok, DataConfig(format="prompt_completion"))
    chatted, _ = tokenize_rows([chat], tok, DataConfig(format="chat"))
    assert chatted[0]["labels"][:len(plain[0]["labels"])] == plain[0]["labels"]
    assert chatted[0]["input_ids"][:len(plain[0]["input_ids"])] == plain[0]["input_ids"]
    two_turns = chat["messages"] + [{"role": "user", "content": "And of Chile?"},
                                    {"role": "assistant", "content": "Santiago"}]
    text = tok.apply_chat_template(two_turns, tokenize=False)
    assert "<|endoftext|>\nQuestion: And of Chile?\nAnswer: Santiago<|endoftext|>" in text
