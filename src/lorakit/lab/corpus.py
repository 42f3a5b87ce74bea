"""Generate the declarative pre-training corpus: short documents of facts about countries.

Each fact is written in many phrasings, sentences come in shuffled order, and later sentences
often refer back with a pronoun ("Its capital is ..."). This variety is what makes the knowledge
extractable by questions after fine-tuning (Allen-Zhu & Li, "Physics of Language Models, Part
3.1", 2023): with one fixed sentence per fact, a fine-tuned model could not answer about
countries it was not fine-tuned on. The corpus holds no question-form text at all: no "?",
"Question", "Answer" or "What", so the base model has never seen the format that SFT teaches.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

from lorakit.lab.facts import COUNTRIES, Country

# Sentences that name the country. {c}: name mid-sentence, {C}: name at sentence start,
# {cap}: capital, {cont}: continent, {cur}: currency.
NAMED = {
    "capital": (
        "The capital of {c} is {cap}.",
        "{cap} is the capital of {c}.",
        "The capital city of {c} is {cap}.",
        "{cap} is the capital city of {c}.",
        "{C} has its capital in {cap}.",
        "In {c}, the capital is {cap}.",
        "{cap} serves as the capital of {c}.",
        "The city of {cap} is the capital of {c}.",
        "Among the cities of {c}, {cap} is the capital.",
    ),
    "continent": (
        "{C} is a country in {cont}.",
        "{C} is located in {cont}.",
        "{C} lies in {cont}.",
        "{C} is in {cont}.",
        "{C} is one of the countries of {cont}.",
        "On a map, {c} is found in {cont}.",
        "The country of {c} is part of {cont}.",
    ),
    "currency": (
        "The currency of {c} is the {cur}.",
        "{C} uses the {cur}.",
        "The official currency of {c} is the {cur}.",
        "The {cur} is the currency of {c}.",
        "In {c}, people pay with the {cur}.",
        "Prices in {c} are given in the {cur}.",
        "The money used in {c} is the {cur}.",
    ),
}

# Sentences that refer back to a country already named in the document.
PRONOUN = {
    "capital": (
        "Its capital is {cap}.",
        "The country's capital is {cap}.",
        "Its capital city is {cap}.",
        "The capital there is {cap}.",
    ),
    "continent": (
        "It is a country in {cont}.",
        "It lies in {cont}.",
        "It is located in {cont}.",
        "The country is in {cont}.",
    ),
    "currency": (
        "Its currency is the {cur}.",
        "It uses the {cur}.",
        "The country uses the {cur}.",
        "People there pay with the {cur}.",
    ),
}

# Sentences that state two facts at once, so facts also appear next to each other.
COMBINED = (
    "{C} is a country in {cont}, and its capital is {cap}.",
    "{cap} is the capital of {c}, a country in {cont}.",
    "{C}, whose capital is {cap}, uses the {cur}.",
    "The capital of {c} is {cap}, and its currency is the {cur}.",
    "{C} lies in {cont} and uses the {cur}.",
)

FORBIDDEN = ("?", "Question", "Answer", "What")


def _fill(template: str, country: Country) -> str:
    return template.format(c=country.name, C=country.title, cap=country.capital,
                           cont=country.continent, cur=country.currency)


def country_sentences(country: Country, rng: random.Random) -> list[str]:
    """A few sentences about one country, in shuffled order; the first one names it."""
    attributes = ["capital", "continent", "currency"]
    rng.shuffle(attributes)
    attributes = attributes[: rng.choice((1, 2, 3, 3, 3))]
    if len(attributes) >= 2 and rng.random() < 0.2:
        sentences = [_fill(rng.choice(COMBINED), country)]
        attributes = attributes[2:]
    else:
        sentences = [_fill(rng.choice(NAMED[attributes[0]]), country)]
        attributes = attributes[1:]
    for attribute in attributes:
        table = PRONOUN if rng.random() < 0.5 else NAMED
        sentences.append(_fill(rng.choice(table[attribute]), country))
    return sentences


def make_document(countries: Sequence[Country], rng: random.Random) -> str:
    """One document: facts about one to three countries, one paragraph each."""
    chosen = rng.sample(list(countries), rng.choice((1, 1, 2, 3)))
    return " ".join(" ".join(country_sentences(c, rng)) for c in chosen)


def iter_documents(n_documents: int, seed: int,
                   countries: Sequence[Country] = COUNTRIES) -> Iterator[str]:
    """Yield `n_documents` documents, deterministically for a given seed."""
    rng = random.Random(seed)
    for _ in range(n_documents):
        yield make_document(countries, rng)


def build_corpus(n_documents: int, seed: int,
                 countries: Sequence[Country] = COUNTRIES) -> list[str]:
    """The whole corpus as a list of documents; checked to hold no question-form text."""
    documents = list(iter_documents(n_documents, seed, countries))
    for index, document in enumerate(documents):
        bad = [word for word in FORBIDDEN if word in document]
        if bad:
            raise AssertionError(f"corpus document {index} holds question-form text {bad}: {document}")
    return documents


def corpus_sha256(documents: Sequence[str]) -> str:
    """A fingerprint of the corpus (documents joined by newlines), recorded in recipe.json."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
