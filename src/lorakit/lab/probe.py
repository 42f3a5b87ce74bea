"""(a)'s fill-in-the-blank probe: did the base model know the facts before any fine-tuning?

A held-out question ("What is the capital of France?") becomes the start of the pre-training corpus's first
sentence for that fact ("The capital of France is"), cut where the answer begins, so the probe asks in the only
form the base model ever read. The base model's greedy continuation is right when it starts with the answer as a
whole word ("Paris." or "Paris, and its currency ..." count; "Parisian" does not).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from lorakit.infer.evaluate import evaluate
from lorakit.infer.metrics import normalize
from lorakit.lab.corpus import NAMED
from lorakit.lab.datasets import answer
from lorakit.lab.facts import country

FIELDS = {"capital": "{cap}", "continent": "{cont}", "currency": "{cur}"}  # the answer's placeholder per kind


def cloze(kind: str, name: str) -> str:
    """The corpus's first sentence about `kind`, up to where the answer begins: 'The capital of France is'."""
    template = NAMED[kind][0]
    fact = country(name)
    head = template[:template.index(FIELDS[kind])].rstrip()
    return head.format(c=fact.name, C=fact.title)


def probe_rows(questions: Sequence[dict]) -> list[dict]:
    """One probe per held-out question (its kind and country), with the reference answer."""
    return [{"prompt": cloze(row["kind"], row["country"]), "completion": " " + answer(country(row["country"]),
                                                                                      row["kind"]),
             "kind": row["kind"], "country": row["country"]} for row in questions]


def starts_with_answer(prediction: str, reference: str) -> bool:
    """Whether the normalised prediction begins with the normalised reference, followed by no letter or digit."""
    said, wanted = normalize(prediction), normalize(reference)
    return said.startswith(wanted) and not re.match(r"\w", said[len(wanted):len(wanted) + 1])


def score_probe(model: Any, tokenizer: Any, rows: Sequence[dict]) -> dict:
    """{"rows": the probes, "predictions", "correct": [bool per probe]} of greedy continuations."""
    predictions = evaluate(model, tokenizer, rows, max_new_tokens=8, batch_size=64)["predictions"]
    return {"rows": list(rows), "predictions": predictions,
            "correct": [starts_with_answer(p, r["completion"]) for p, r in zip(predictions, rows)]}
