"""The server app in-process (FastAPI TestClient) on tiny Llama / GPT-2 / BLOOM models with two adapters."""
from __future__ import annotations

import pytest
from _infer_fixtures import random_adapter
from _tiny import CHATML, tiny_tokenizer
from conftest import TINY_MODELS
from fastapi.testclient import TestClient

from lorakit.adapters.multi import add_adapter
from lorakit.infer.generate import generate_texts
from lorakit.infer.api import ServerConfig
from lorakit.infer.server import create_app


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_completions_and_chat_per_adapter_on_tiny_models(arch, tmp_path, one_thread):
    build = lambda: TINY_MODELS[arch](vocab_size=320)  # noqa: E731  (the tiny tokenizer's vocabulary)
    tokenizer = tiny_tokenizer(CHATML)
    model, reference = build(), build()
    for seed, name in enumerate(["x", "y"]):
        folder = random_adapter(build, tmp_path / name, seed)
        add_adapter(model, name, folder)
        add_adapter(reference, name, folder)
    app = create_app(model, tokenizer, ServerConfig(context_length=48, window_ms=1))
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "x", "y"]
        for name in ("base", "x", "y"):
            adapter = None if name == "base" else name
            body = {"model": name, "prompt": "Hello world", "max_tokens": 6, "temperature": 0}
            text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert text == generate_texts(reference, tokenizer, ["Hello world"], adapters=[adapter], chat=False,
                                          max_new_tokens=6)[0]
            chat = {"model": name, "messages": [{"role": "user", "content": "The quick"}], "max_tokens": 5,
                    "temperature": 0}
            answer = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
            assert answer == generate_texts(reference, tokenizer, ["The quick"], adapters=[adapter], chat=True,
                                            max_new_tokens=5)[0]
        too_long = client.post("/v1/completions", json={"model": "x", "prompt": "Hello " * 60, "max_tokens": 2})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        bad_top_p = client.post("/v1/completions", json={"model": "x", "prompt": "Hi", "top_p": 0})
        assert bad_top_p.status_code == 400 and bad_top_p.json()["error"]["param"] == "top_p"
        assert client.post("/v1/completions", json={"model": "x", "prompt": "Hi", "n": 0}).json()["error"]["param"] == "n"
        assert client.post("/admin/adapters", json={"name": "z", "path": "p"}).status_code == 403  # no key set
