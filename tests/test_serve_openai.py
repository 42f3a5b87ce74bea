"""The real server (uvicorn in a subprocess on 127.0.0.1) with the embedded model and two adapters,
spoken to with the official openai client (streaming and not, several adapters at once) and httpx."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from _infer_fixtures import random_adapter

from lorakit.adapters.multi import add_adapter
from lorakit.infer.generate import generate_texts
from lorakit.models import load_model, load_tokenizer

KEY = "test-key"
PROMPTS = ["What is the capital of France?", "Question: Where is Lima?\nAnswer:", "Hello"]
pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    build = lambda: load_model("embedded")  # noqa: E731
    adapters = {name: random_adapter(build, folder / name, seed) for seed, name in enumerate(["alpha", "beta"])}
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main())", "serve",
               "--port", str(port), "--api-key", KEY, "--batch-window-ms", "300", "--context-length", "64",
               "--max-body-bytes", "20000", "--adapter", f"alpha={adapters['alpha']}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                break
        except httpx.TransportError:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.1)
    yield url, adapters
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def local(server):
    """The same model and adapters in this process: what the server must answer."""
    model, tokenizer = load_model("embedded").eval(), load_tokenizer("embedded")
    for name, path in server[1].items():
        add_adapter(model, name, path)
    return model, tokenizer


def _expected(local, prompts, names, chat):
    model, tokenizer = local
    return generate_texts(model, tokenizer, prompts, adapters=[None if n == "base" else n for n in names],
                          chat=chat, max_new_tokens=8)


def test_openai_client_streaming_admin_and_batching(server, local):
    url, adapters = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    admin = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(f"{url}/admin/adapters", json={"name": "beta", "path": str(adapters["beta"])}, headers=admin)
    assert loaded.status_code == 200, loaded.text
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]

    answer = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert answer.choices[0].text == _expected(local, [PROMPTS[1]], ["alpha"], chat=False)[0]
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == _expected(local, [PROMPTS[0]], ["beta"], chat=True)[0]
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[2]}],
                                            max_tokens=8, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert len(pieces) > 2 and "".join(pieces) == _expected(local, [PROMPTS[2]], ["alpha"], chat=True)[0]

    jobs = [(p, n) for p in PROMPTS for n in ("base", "alpha", "beta")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: client.chat.completions.create(
            model=job[1], messages=[{"role": "user", "content": job[0]}], max_tokens=8,
            temperature=0).choices[0].message.content, jobs))
    assert texts == _expected(local, [p for p, _ in jobs], [n for _, n in jobs], chat=True)
    assert len({texts[0], texts[1], texts[2]}) > 1  # the adapters change the answer
    assert httpx.get(f"{url}/admin/stats", headers=admin).json()["largest_batch"] > 1  # requests shared a batch

    assert httpx.delete(f"{url}/admin/adapters/beta", headers=admin).status_code == 200
    assert [m.id for m in client.models.list()] == ["base", "alpha"]


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    post = lambda body, **kw: httpx.post(f"{url}/v1/completions", json=body, headers=kw.get("headers", auth))  # noqa
    ok = {"model": "alpha", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    assert "'nope' does not exist" in _error(post({**ok, "model": "nope"}), 404, "model_not_found")["message"]
    bad_json = httpx.post(f"{url}/v1/completions", content=b'{"model": ', headers=auth)
    _error(bad_json, 400, "invalid_json")
    _error(post({**ok, "prompt": "Hello " * 80}), 400, "context_length_exceeded")
    assert _error(post({**ok, "max_tokens": -3}), 400)["param"] == "max_tokens"
    assert _error(post({**ok, "max_tokens": 10**9}), 400)["param"] == "max_tokens"
    _error(httpx.post(f"{url}/v1/completions", content=b"x" * 30000, headers=auth), 413, "request_too_large")
    _error(post(ok, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _error(httpx.post(f"{url}/admin/adapters", json={"name": "x", "path": "/nonexistent"}, headers=auth), 400)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).completions.create(model="nope", prompt="x", max_tokens=2)
    assert post(ok).status_code == 200  # still serving
