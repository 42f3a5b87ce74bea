"""The embedded preference set: the instruction set's questions, each with a right and a wrong answer.

Every row asks one of the instruction set's questions (lab/datasets.py: the same prompt layout, phrasings
and country split, so the held-out countries are the SFT evaluation's) and holds

    chosen    the right answer, as the SFT rows answer: " Amsterdam"
    rejected  a plausible wrong answer: for a capital, the capital of another country on the same continent;
              for a currency, another currency of that continent; for a continent, a neighbouring one.
              A share of rows (WRONG_FORMAT_SHARE) rejects the right fact in the wrong format instead, a
              sentence where the SFT rows answer in a word or two: " The capital of Peru is Lima."

`measure_preferences` scores a model on the held-out rows: exact-match accuracy of its greedy answers, the
mean margin log p(chosen) - log p(rejected) (summed over each answer's trained tokens, EOS included, as DPO
sums them), the share of rows where the chosen answer is the likelier, and the loss on general text
(forgetting, as the quickstart measures it).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lorakit.data import DataConfig
from lorakit.data.preference import tokenize_preference_rows
from lorakit.infer.evaluate import evaluate
from lorakit.infer.metrics import example_losses
from lorakit.lab.datasets import QUESTIONS, answer, qa_row, split_countries, write_jsonl
from lorakit.lab.facts import COUNTRIES, Country
from lorakit.lab.report import accuracy_by_kind
from lorakit.run import pad_id_of

WRONG_FORMAT_SHARE = 0.25  # rows whose rejected answer is the right fact in a sentence
PREFERENCE_FILES = ("pref_train.jsonl", "pref_eval.jsonl")  # beside sft_train.jsonl and sft_eval.jsonl

# The continents a wrong continent is drawn from: each one's neighbours, across a border or a short sea.
NEIGHBOURS = {
    "Africa": ("Asia", "Europe"),
    "Asia": ("Europe", "Africa", "Oceania"),
    "Europe": ("Asia", "Africa"),
    "North America": ("South America", "Europe"),
    "Oceania": ("Asia",),
    "South America": ("North America", "Africa"),
}

SENTENCES = {
    "capital": "The capital of {name} is {answer}.",
    "continent": "{title} is in {answer}.",
    "currency": "{title} uses the {answer}.",
}


def wrong_fact(row: Country, kind: str, rng: random.Random) -> str:
    """A plausible wrong answer of one kind for `row`: never the right one."""
    if kind == "continent":
        return rng.choice(NEIGHBOURS[row.continent])
    right = answer(row, kind)
    same_continent = sorted({answer(other, kind) for other in COUNTRIES
                             if other.continent == row.continent and answer(other, kind) != right})
    return rng.choice(same_continent or sorted({answer(other, kind) for other in COUNTRIES} - {right}))


def wrong_format(row: Country, kind: str) -> str:
    """The right answer in the wrong format: a whole sentence."""
    return SENTENCES[kind].format(name=row.name, title=row.title, answer=answer(row, kind))


def preference_row(row: Country, kind: str, phrasing: int, rng: random.Random) -> dict:
    """One preference row: the SFT row's prompt, its completion chosen, a wrong answer rejected."""
    sft = qa_row(row, kind, phrasing)
    by_format = rng.random() < WRONG_FORMAT_SHARE
    rejected = wrong_format(row, kind) if by_format else wrong_fact(row, kind, rng)
    return {"prompt": sft["prompt"], "chosen": sft["completion"], "rejected": " " + rejected,
            "kind": kind, "country": row.name, "rejected_kind": "wrong_format" if by_format else "wrong_fact"}


def train_preference_rows(countries: Sequence[Country], seed: int = 0, per_kind: int = 2) -> list[dict]:
    """`per_kind` distinct phrasings per country and kind (as the SFT training rows), shuffled."""
    rng = random.Random(f"lorakit-preference:{seed}")
    rows = [preference_row(row, kind, phrasing, rng) for row in countries for kind, phrasings in QUESTIONS.items()
            for phrasing in rng.sample(range(len(phrasings)), per_kind)]
    rng.shuffle(rows)
    return rows


def eval_preference_rows(countries: Sequence[Country], seed: int = 0) -> list[dict]:
    """The canonical question of each kind for each held-out country (the SFT evaluation's questions)."""
    rng = random.Random(f"lorakit-preference-eval:{seed}")
    return [preference_row(row, kind, 0, rng) for row in countries for kind in QUESTIONS]


def preference_sets(seed: int = 0) -> dict[str, list[dict]]:
    """{file name: rows} of the embedded preference set, split by country as the instruction set is."""
    train, held_out = split_countries(seed)
    return dict(zip(PREFERENCE_FILES, (train_preference_rows(train, seed), eval_preference_rows(held_out, seed))))


def write_preference_sets(out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write pref_train.jsonl and pref_eval.jsonl into `out_dir`; return their row counts."""
    counts = {}
    for name, rows in preference_sets(seed).items():
        write_jsonl(rows, Path(out_dir) / name)
        counts[name] = len(rows)
    return counts


# -- what preference tuning changed ----------------------------------------------------------------------------

def margins(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 64) -> list[float]:
    """log p(chosen) - log p(rejected) of each row under `model`: each answer's token log-probs summed."""
    pairs, _ = tokenize_preference_rows(list(rows), tokenizer, DataConfig(format="preference", max_length=128))
    examples = [pair[side] for pair in pairs for side in ("chosen", "rejected")]
    losses = example_losses(model, examples, pad_id_of(tokenizer), batch_size=batch_size)  # (-log p, tokens)
    return [losses[2 * k + 1][0] - losses[2 * k][0] for k in range(len(pairs))]


def margin_scores(model, tokenizer, preference_rows: Sequence[dict]) -> dict:
    """The mean margin, the mean by kind of rejected answer, and the share of rows whose chosen answer is the
    likelier, of `model` on preference rows."""
    found = margins(model, tokenizer, preference_rows)
    by_kind: dict[str, list[float]] = {}
    for row, margin in zip(preference_rows, found):
        by_kind.setdefault(row["rejected_kind"], []).append(margin)
    return {"margin": sum(found) / len(found),
            "margin_by_rejected": {kind: sum(values) / len(values) for kind, values in sorted(by_kind.items())},
            "chosen_likelier": sum(margin > 0 for margin in found) / len(found)}


def measure_preferences(model, tokenizer, preference_rows: Sequence[dict], general_rows: Sequence[dict]) -> dict:
    """Held-out accuracy (greedy exact match, by kind), margins (`margin_scores`) and the loss on general text,
    of `model` on the held-out preference rows; "predictions": its answers."""
    questions = [{"prompt": row["prompt"], "completion": row["chosen"], "kind": row["kind"]}
                 for row in preference_rows]
    qa = evaluate(model, tokenizer, questions, max_new_tokens=16, batch_size=64)
    general = evaluate(model, tokenizer, list(general_rows), batch_size=64)
    return {"accuracy": accuracy_by_kind(questions, qa["predictions"]),
            **margin_scores(model, tokenizer, preference_rows),
            "general_loss": general["loss"], "predictions": qa["predictions"]}
