"""Loading models: the embedded model offline and within its size budget; clear errors otherwise."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models import EMBEDDED_DIR, load_model, load_tokenizer

SIZE_BUDGET = 10 * 1024 * 1024  # bytes of weights shipped inside the package


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Hub offline mode, as on a machine with no network (and no slow network retries)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_embedded_model_loads_offline_within_budget():
    weights = EMBEDDED_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= SIZE_BUDGET
    assert not list(EMBEDDED_DIR.glob("*.bin"))  # safetensors only
    model = load_model("embedded")
    tokenizer = load_tokenizer("embedded")
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Japan?"}], tokenize=False,
        add_generation_prompt=True)
    assert rendered == "Question: What is the capital of Japan?\nAnswer:"


def test_embedded_model_knows_its_facts_declaratively():
    from lorakit.infer.generate import greedy_generate

    model, tokenizer = load_model("embedded"), load_tokenizer("embedded")
    answers = greedy_generate(model, tokenizer, ["The capital of the Netherlands is",
                                                  "Japan uses the"], max_new_tokens=4)
    assert answers[0].startswith(" Amsterdam")
    assert answers[1].startswith(" Japanese yen")


def test_dtype_and_device_are_applied():
    model = load_model("embedded", dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LorakitError, match="unknown dtype 'int3'"):
        load_model("embedded", dtype="int3")


def test_recipe_records_a_reproducible_corpus():
    from lorakit.lab.corpus import build_corpus, corpus_sha256

    recipe = json.loads((EMBEDDED_DIR.parent / "recipe.json").read_text())
    documents = build_corpus(recipe["config"]["documents"], recipe["config"]["seed"])
    assert corpus_sha256(documents) == recipe["corpus"]["sha256"]
    assert recipe["measured"]["declarative_recall"] >= 0.95
    assert recipe["measured"]["heldout_qa_exact_match"] <= 0.05


def test_unloadable_names_raise_clear_errors(tmp_path):
    with pytest.raises(LorakitError, match="not a local folder.*no network"):
        load_model("no-such-user/no-such-model-xyz")
    with pytest.raises(LorakitError, match="no network"):
        load_tokenizer("no-such-user/no-such-model-xyz")
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(LorakitError, match="is a file; pass the folder"):
        load_model(file)
    with pytest.raises(LorakitError, match=f"could not load the model from {tmp_path}"):
        load_model(tmp_path)


def test_local_folder_round_trip(tmp_path):
    model = load_model("embedded")
    model.save_pretrained(tmp_path)
    load_tokenizer("embedded").save_pretrained(tmp_path)
    again = load_model(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert load_tokenizer(tmp_path)("Amsterdam")["input_ids"] == \
        load_tokenizer("embedded")("Amsterdam")["input_ids"]
