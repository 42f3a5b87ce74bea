"""The embedded instruction dataset: question/answer pairs about countries, split by country.

Training rows ask about ~60% of the countries; the evaluation rows ask about the other ~40%,
whose facts the model met only in pre-training. A model that answers those held-out questions
has learned the *behaviour* of answering, not the facts. A third file holds fresh documents in
the pre-training style (none of them in the corpus): the loss on them measures forgetting.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from lorakit.lab.corpus import iter_documents
from lorakit.lab.facts import COUNTRIES, Country, country


PROMPT = "Question: {question}\nAnswer:"

# The first phrasing of each kind is the canonical one, used for the held-out evaluation.
QUESTIONS = {
    "capital": (
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "What is the capital city of {c}?",
        "Name the capital of {c}.",
    ),
    "continent": (
        "On which continent is {c}?",
        "Which continent is {c} in?",
        "In which continent does {c} lie?",
        "Name the continent where {c} is located.",
    ),
    "currency": (
        "What currency is used in {c}?",
        "What is the currency of {c}?",
        "Which currency does {c} use?",
        "Name the currency of {c}.",
    ),
}

# Held out whatever the seed: the demo asks about these.
SHOWCASE = ("the Netherlands", "Japan", "Kenya", "Peru", "Canada", "Norway")


def answer(row: Country, kind: str) -> str:
    """The reference answer for one kind of question."""
    return {"capital": row.capital, "continent": row.continent, "currency": row.currency}[kind]


def qa_row(row: Country, kind: str, phrasing: int = 0) -> dict:
    """One prompt/completion row; the completion starts with a space, the data room adds EOS."""
    question = QUESTIONS[kind][phrasing].format(c=row.name)
    return {"prompt": PROMPT.format(question=question), "completion": " " + answer(row, kind),
            "kind": kind, "country": row.name}


def split_countries(seed: int = 0, train_fraction: float = 0.6
                    ) -> tuple[list[Country], list[Country]]:
    """(training countries, held-out countries), disjoint; SHOWCASE is always held out."""
    showcase = [country(name) for name in SHOWCASE]
    rest = [row for row in COUNTRIES if row not in showcase]
    random.Random(seed).shuffle(rest)
    n_train = round(train_fraction * len(COUNTRIES))
    train = sorted(rest[:n_train], key=lambda row: row.name)
    held_out = sorted(rest[n_train:] + showcase, key=lambda row: row.name)
    return train, held_out


def train_rows(countries: Sequence[Country], seed: int = 0, per_kind: int = 2) -> list[dict]:
    """`per_kind` distinct phrasings per country and kind, shuffled."""
    rng = random.Random(seed)
    rows = []
    for row in countries:
        for kind, phrasings in QUESTIONS.items():
            for phrasing in rng.sample(range(len(phrasings)), per_kind):
                rows.append(qa_row(row, kind, phrasing))
    rng.shuffle(rows)
    return rows


def eval_rows(countries: Sequence[Country]) -> list[dict]:
    """The canonical question of each kind for each held-out country."""
    return [qa_row(row, kind) for row in countries for kind in QUESTIONS]


def general_rows(n: int, seed: int, exclude: Iterable[str]) -> list[dict]:
    """`n` fresh pre-training-style documents that are not in `exclude` (the corpus)."""
    excluded = set(exclude)
    rows: list[dict] = []
    for document in iter_documents(20 * n, seed):
        if document not in excluded and all(document != row["text"] for row in rows):
            rows.append({"text": document})
        if len(rows) == n:
            break
    return rows


def write_jsonl(rows: Iterable[dict], path: Path) -> None:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a .jsonl file."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build_datasets(out_dir: Path, corpus: Sequence[str], seed: int = 0,
                   n_general: int = 200) -> dict[str, int]:
    """Write sft_train.jsonl, sft_eval.jsonl and general.jsonl into `out_dir`; return row counts."""
    train, held_out = split_countries(seed)
    files = {
        "sft_train.jsonl": train_rows(train, seed),
        "sft_eval.jsonl": eval_rows(held_out),
        "general.jsonl": general_rows(n_general, seed + 1_000_003, corpus),
    }
    for name, rows in files.items():
        write_jsonl(rows, Path(out_dir) / name)
    return {name: len(rows) for name, rows in files.items()}
