"""OpenAI semantics of the server, spoken to with the official openai client through the FastAPI app
in-process (Starlette's TestClient is an httpx client): stop strings, logprobs, echo, content parts,
request validation, the request log; and the stop-string hold-back on its own."""
from __future__ import annotations

import asyncio
import logging
import re

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from lorakit.infer.api import ServerConfig
from lorakit.infer.batcher import Batcher, Job, RowText, held_back
from lorakit.decoding.decode import TokenLogprobs
from lorakit.infer.generate import stop_token_ids
from lorakit.decoding.sampling import Sampling
from lorakit.infer.server import create_app
from lorakit.models import load_model, load_tokenizer

PROMPT = "Question: Where is Lima?\nAnswer:"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def served():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine (as conftest's one_thread)
    model, tokenizer = load_model("embedded").eval(), load_tokenizer("embedded")
    app = create_app(model, tokenizer, ServerConfig(context_length=128, window_ms=1))
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http), http, model, tokenizer
    torch.set_num_threads(threads)


def _chat(client, **kw):
    return client.chat.completions.create(**{"model": "base", "messages": CHAT, "temperature": 0, **kw})


def _complete(client, **kw):
    return client.completions.create(**{"model": "base", "prompt": PROMPT, "temperature": 0, **kw})


def _stop_in(full: str) -> str:
    """A stop string from the middle of a generation (its first occurrence is where it cuts)."""
    assert len(full) > 12, full
    return full[len(full) // 2: len(full) // 2 + 3]


def test_stop_strings_cut_chat_and_completions_streaming_or_not(served):
    client = served[0]
    full = _chat(client, max_tokens=24)
    text = full.choices[0].message.content
    stop = _stop_in(text)
    expected = text[:text.index(stop)]
    cut = _chat(client, max_tokens=24, stop=stop)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens  # generation ended at the stop string
    stream = _chat(client, max_tokens=24, stop=["never there", stop], stream=True,
                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == cut.usage.completion_tokens

    full = _complete(client, max_tokens=24).choices[0].text
    stop = _stop_in(full)
    expected = full[:full.index(stop)]
    cut = _complete(client, max_tokens=24, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in _complete(client, max_tokens=24, stop=stop, stream=True)]
    assert "".join(pieces) == expected
    assert _complete(client, max_tokens=6, stop="never there").choices[0].finish_reason == "length"


class _Letters:
    """A tokenizer whose token i is the i-th character of a text (decode joins them)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.text[i] for i in ids)


def test_stop_hold_back_never_sends_text_that_is_cut_later():
    assert held_back("Hello wo", 0, ("world", "xyz")) == 2 and held_back("Hello wo", 7, ("world",)) == 0
    assert held_back("Hello", 0, ("world",)) == 0
    text = "abc wow wonder world!"
    row, sent, logprobs = RowText(_Letters(text), ("world", "wonderful")), "", []
    for token in range(len(text)):
        piece, infos = row.push(token, TokenLogprobs(-float(token), []))
        sent, logprobs = sent + piece, logprobs + infos
        assert "abc wow wonder world"[:len(sent)] == sent  # never text that a stop would cut
        assert all(info.offset < len(sent) for info in infos)  # a token's logprob goes with its text
        if row.stopped:
            break
    assert sent == "abc wow wonder " and row.stopped and token == text.index("world") + 4
    assert [info.offset for info in logprobs] == list(range(len(sent)))  # "world"'s tokens are cut
    assert row.finish() == ("", [])
    row = RowText(_Letters("a wo"), ("world",))
    assert [row.push(t, None)[0] for t in range(4)] == ["a", " ", "", ""] and row.finish()[0] == "wo"


def _run_batches(model, tokenizer, jobs: list[list[Job]]) -> tuple[list[tuple], int]:
    """Each list of jobs as one batch through a Batcher; per job (text, [(token, top tokens)], the done
    event, [logprob]); and the largest batch."""
    async def run():
        batcher = Batcher(model, tokenizer, stop_token_ids(tokenizer, model), window_s=0.5)
        task = asyncio.create_task(batcher.run_forever())
        results = []
        for batch in jobs:
            for job in batch:
                batcher.queue.put_nowait(job)
            for job in batch:
                text, infos = "", []
                while (event := await job.events.get())[0] == "text":
                    text, infos = text + event[1], infos + event[2]
                results.append((text, [(i.token, [t for t, _ in i.top]) for i in infos], event,
                                [i.logprob for i in infos]))
        task.cancel()
        return results, batcher.stats.largest
    return asyncio.run(run())


def test_rows_with_stop_strings_and_logprobs_batched_with_others_answer_as_alone(served):
    _, _, model, tokenizer = served
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "Once upon a time", PROMPT)]
    make = lambda: [Job(prompts[0], Sampling(), 12, None, stop=(" is", "euro")),  # noqa: E731
                    Job(prompts[1], Sampling(temperature=0.8), 12, None, seed=5, top_logprobs=2),
                    Job(prompts[2], Sampling(), 12, None, stop=("Asia",), top_logprobs=0)]
    together, largest = _run_batches(model, tokenizer, [make()])
    alone, _ = _run_batches(model, tokenizer, [[job] for job in make()])
    assert largest == 3 and [r[:3] for r in together] == [r[:3] for r in alone]
    for row_together, row_alone in zip(together, alone):  # padding in the batch: fp32 sums reordered
        assert row_together[3] == pytest.approx(row_alone[3], abs=1e-4)
    assert together[0][0] == " Paris, and its currency" and together[0][2][1] == "stop"  # the first stop found
    assert together[2][0].endswith("a country in ") and together[2][2][1] == "stop"
    assert len(together[1][1]) == together[1][2][2] and together[0][1] == []


def _greedy_logprobs(model, ids: list[int], steps: int) -> list[torch.Tensor]:
    """Each step's log_softmax of the model's logits (full forward, no cache), greedily extended."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            out.append(logprobs)
            ids = [*ids, int(logprobs.argmax())]
    return out


def test_chat_logprobs_are_the_models_log_softmax(served):
    client, _, model, tokenizer = served
    answer = _chat(client, max_tokens=6, logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    steps = _greedy_logprobs(model, tokenizer(prompt, add_special_tokens=False)["input_ids"], len(content))
    assert len(content) == answer.usage.completion_tokens == 6
    for entry, logprobs in zip(content, steps):
        best = logprobs.topk(5)
        assert entry.token == tokenizer.decode([int(best.indices[0])], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(float(best.values[0]), abs=1e-4)  # greedy: the chosen is the best
        assert [t.logprob for t in entry.top_logprobs] == sorted([t.logprob for t in entry.top_logprobs],
                                                                 reverse=True)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token
    assert "".join(e.token for e in content) == answer.choices[0].message.content
    streamed = [e for c in _chat(client, max_tokens=6, logprobs=True, top_logprobs=5, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in content]
    assert _chat(client, max_tokens=2).choices[0].logprobs is None
    assert _chat(client, max_tokens=2, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


def test_completion_logprobs_sampled_and_streamed(served):
    client, _, model, tokenizer = served
    answer = _complete(client, max_tokens=5, logprobs=3, temperature=0.9, seed=3)
    text, logprobs = answer.choices[0].text, answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 5
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(5)]
    ids = tokenizer(PROMPT)["input_ids"]
    generated = tokenizer(PROMPT + text)["input_ids"][len(ids):]
    assert [tokenizer.decode([t]) for t in generated] == logprobs.tokens  # the generated ids, recovered
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([ids + generated])).logits[0].float(), -1)
    for step, (token, chosen, top) in enumerate(zip(generated, logprobs.token_logprobs, logprobs.top_logprobs)):
        assert chosen == pytest.approx(float(full[len(ids) - 1 + step, token]), abs=1e-4)  # raw logits, not /0.9
        assert 3 <= len(top) <= 4 and top[logprobs.tokens[step]] == chosen  # the chosen token is always there
    pieces = list(_complete(client, max_tokens=5, logprobs=3, temperature=0.9, seed=3, stream=True))
    assert [t for p in pieces if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens] == logprobs.tokens


def test_n_choices_sample_with_seed_plus_index_streaming_or_not(served):
    """n > 1: choice i is what a one-choice request with seed + i answers (so choice 0 is the n=1 answer); the
    usage counts the prompt once and every choice's tokens; a stream carries each choice's pieces under its index
    and a finish chunk for each; greedy choices are all the greedy answer."""
    client = served[0]
    alone = [_chat(client, temperature=1.0, max_tokens=8, seed=7 + i) for i in range(3)]
    texts = [reply.choices[0].message.content for reply in alone]
    assert len(set(texts)) > 1  # other seeds, other samples: the test can tell the choices apart
    stats = served[1].app.state.batcher.stats
    shared = stats.shared_prompts
    many = _chat(client, temperature=1.0, max_tokens=8, seed=7, n=3)
    assert stats.shared_prompts == shared + 2  # one prompt pass, copied to the other two choices
    assert [c.index for c in many.choices] == [0, 1, 2] and [c.message.content for c in many.choices] == texts
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(reply.usage.completion_tokens for reply in alone)
    chunks = list(_chat(client, temperature=1.0, max_tokens=8, seed=7, n=3, stream=True,
                        stream_options={"include_usage": True}))
    for i, text in enumerate(texts):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(part.delta.content or "" for part in mine) == text
        assert [part.finish_reason for part in mine if part.finish_reason] == [many.choices[i].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == many.usage.completion_tokens
    completions = _complete(client, temperature=1.0, max_tokens=6, seed=3, n=2)
    assert [c.text for c in completions.choices] == [
        _complete(client, temperature=1.0, max_tokens=6, seed=3 + i).choices[0].text for i in range(2)]
    greedy = _complete(client, max_tokens=6, n=3)
    assert [c.text for c in greedy.choices] == [_complete(client, max_tokens=6).choices[0].text] * 3


def test_echo_on_completions_and_not_on_chat(served):
    client = served[0]
    plain = _complete(client, max_tokens=6).choices[0].text
    assert _complete(client, max_tokens=6, echo=True).choices[0].text == PROMPT + plain
    assert "".join(c.choices[0].text for c in _complete(client, max_tokens=6, echo=True, stream=True)) == \
        PROMPT + plain
    with pytest.raises(openai.BadRequestError) as error:
        _complete(client, max_tokens=6, echo=True, logprobs=2)
    assert error.value.param == "echo" and "echo with logprobs is not supported" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, max_tokens=2, extra_body={"echo": True})
    assert error.value.param == "echo" and "unrecognized request argument" in error.value.message


def test_content_parts_are_joined_and_non_text_parts_refused(served):
    client = served[0]
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    assert _chat(client, messages=[{"role": "user", "content": parts}], max_tokens=6).choices[0].message.content == \
        _chat(client, messages=joined, max_tokens=6).choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, messages=[{"role": "user", "content": [parts[0], image]}], max_tokens=2)
    assert error.value.param == "messages[0].content" and "'image_url'" in error.value.message


@pytest.mark.parametrize("change, param", [
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": "5"}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 7}, "stop"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"), ({"messages": []}, "messages"),
    ({"model": None}, "model"), ({"n": 0}, "n"), ({"n": 129}, "n"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
    ({"seed": 2**64}, "seed"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_completion_tokens": 500}, "max_completion_tokens"),
    ({"max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
])
def test_invalid_chat_bodies_are_openai_400s_naming_the_param(served, change, param):
    http = served[1]
    response = http.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_nulls_are_unset_and_max_completion_tokens_is_the_budget(served):
    client, http = served[:2]
    body = {"model": "base", "messages": CHAT, "max_tokens": 3, "temperature": 0, "top_p": None, "stop": None,
            "seed": None}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert _chat(client, max_completion_tokens=4).usage.completion_tokens == 4


def test_invalid_completion_bodies_through_the_client(served):
    client = served[0]
    for change, param in [({"logprobs": 6}, "logprobs"), ({"prompt": ""}, "prompt"), ({"max_tokens": 0}, "max_tokens"),
                          ({"extra_body": {"suffix": "x"}}, "suffix")]:
        with pytest.raises(openai.BadRequestError) as error:
            _complete(client, **{"max_tokens": 2, **change})
        assert error.value.status_code == 400 and error.value.param == param


def test_one_log_line_per_request(served, caplog):
    client = served[0]
    caplog.set_level(logging.INFO, logger="lorakit.serve")
    answer = _complete(client, max_tokens=4)
    streamed = list(_chat(client, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    with pytest.raises(openai.BadRequestError):
        _complete(client, max_tokens=4, temperature=7)
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve"]
    assert len(lines) == 3 and all(r.levelno == logging.INFO for r in caplog.records if r.name == "lorakit.serve")
    pattern = r"(\S+ \S+) model=(\S+) status=(\d+) prompt_tokens=(\S+) completion_tokens=(\S+) ms=([\d.]+)$"
    fields = [re.match(pattern, line).groups() for line in lines]
    usage = streamed[-1].usage
    assert fields[0][:5] == ("POST /v1/completions", "base", "200", str(answer.usage.prompt_tokens), "4")
    assert fields[1][:5] == ("POST /v1/chat/completions", "base", "200", str(usage.prompt_tokens),
                             str(usage.completion_tokens))
    assert fields[2][:3] == ("POST /v1/completions", "-", "400") and float(fields[2][5]) > 0


def test_chat_requests_to_an_adapter_get_its_recorded_prompt_format(tmp_path):
    """An adapter trained on alpaca rows gets its chat questions in the Alpaca layout (its lorakit_run.json);
    the base and completions keep the raw text; an adapter loaded through the admin route too."""
    from lorakit.adapters import LoRA, apply, save_adapter
    from lorakit.adapters.multi import add_adapter
    from lorakit.data.config import DataConfig
    from lorakit.data.prompting import PromptFormat, RunRecord

    tokenizer = load_tokenizer("embedded")
    folder = save_adapter(apply(load_model("embedded"), LoRA(r=2)), tmp_path / "adapter")
    alpaca = PromptFormat.of_run(DataConfig(format="alpaca"), "alpaca", tokenizer)
    RunRecord(alpaca, "embedded").write(folder)
    model = load_model("embedded").eval()
    add_adapter(model, "pirate", folder)
    app = create_app(model, tokenizer, ServerConfig(context_length=256, window_ms=1, api_key="k"), {"pirate": alpaca})
    question = CHAT[0]["content"]
    with TestClient(app, headers={"Authorization": "Bearer k"}) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http)
        tuned = _chat(client, model="pirate", max_tokens=1)
        assert tuned.usage.prompt_tokens == len(alpaca.prompt_ids(tokenizer, question))
        base = _chat(client, max_tokens=1)
        assert base.usage.prompt_tokens < tuned.usage.prompt_tokens
        raw = client.completions.create(model="pirate", prompt=question, max_tokens=1)
        assert raw.usage.prompt_tokens == len(tokenizer(question)["input_ids"])  # completions: raw text
        assert http.post("/admin/adapters", json={"name": "again", "path": str(folder)}).status_code == 200
        assert _chat(client, model="again", max_tokens=1).usage.prompt_tokens == tuned.usage.prompt_tokens


def test_a_full_fine_tuning_model_served_as_the_base_gets_its_recorded_format():
    """`lorakit serve --model RUN/model` (a full fine-tuning run): the base's chat requests get the run's format."""
    from lorakit.data.config import DataConfig
    from lorakit.data.prompting import PromptFormat

    tokenizer = load_tokenizer("embedded")
    alpaca = PromptFormat.of_run(DataConfig(format="alpaca"), "alpaca", tokenizer)
    app = create_app(load_model("embedded").eval(), tokenizer, ServerConfig(context_length=256, window_ms=1),
                     {None: alpaca})
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http)
        reply = _chat(client, max_tokens=1)
    assert reply.usage.prompt_tokens == len(alpaca.prompt_ids(tokenizer, CHAT[0]["content"]))
