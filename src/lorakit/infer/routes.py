"""The HTTP routes of the server (infer/server.py builds the app): OpenAI's completions, chat and models, and admin.

A completion route records the request's model and token counts on `request.state` (model,
prompt_tokens, completion_tokens) for the request log (infer/server.py)."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from lorakit.adapters.modality import modality_slots
from lorakit.adapters.multi import add_adapter, adapter_names, delete_adapter
from lorakit.data.prompting import PromptFormat, read_record
from lorakit.errors import LorakitError
from lorakit.infer.batcher import Batcher, Job, TokenLogprob
from lorakit.infer.api import (APIError, ServerConfig, check_key, completion_id, make_job, media_prompt_of, now,
                               parse_request, read_json)


def _spelt(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _with_chosen(info: TokenLogprob) -> dict[str, float]:
    top = dict(info.top)
    top.setdefault(info.token, info.logprob)
    return top


@dataclass
class Reply:
    """How one request's answer is shaped: OpenAI's chat or completions objects, whole or as chunks."""

    chat: bool
    model: str
    prompt_tokens: int
    logprobs: bool  # the request asked for them
    echo: str = ""  # text shown before the completion (completions' echo); logprob offsets count it
    include_usage: bool = False  # streaming: a last chunk with the usage
    id: str = field(init=False)
    created: int = field(default_factory=now, init=False)

    def __post_init__(self) -> None:
        self.id = completion_id(self.chat)

    def logprobs_of(self, infos: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [{**_spelt(i.token, i.logprob), "top_logprobs": [_spelt(*t) for t in i.top]}
                                for i in infos]}
        # completions' top_logprobs always hold the chosen token too (so up to logprobs + 1 entries)
        return {"tokens": [i.token for i in infos], "token_logprobs": [i.logprob for i in infos],
                "top_logprobs": [_with_chosen(i) for i in infos],
                "text_offset": [len(self.echo) + i.offset for i in infos]}

    def choice(self, text: str, infos: list[TokenLogprob], finish: str | None, delta: bool, index: int = 0) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": self.logprobs_of(infos), "finish_reason": finish}
        content = {"role": "assistant", "content": text} if text or not delta else {}
        return {"index": index, "delta" if delta else "message": content, "logprobs": self.logprobs_of(infos),
                "finish_reason": finish}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def body(self, choices: list[dict], *, chunk: bool, completion_tokens: int | None = None) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return body if completion_tokens is None else {**body, "usage": self.usage(completion_tokens)}


async def _one(job: Job, reply: Reply, index: int) -> tuple[dict, int]:
    """One choice, once its job is done, and its completion tokens."""
    pieces, infos = [reply.echo], []
    while True:
        event = await job.events.get()
        if event[0] == "text":
            pieces.append(event[1])
            infos.extend(event[2])
        elif event[0] == "error":
            raise APIError(500, f"generation failed: {event[1]}", type="server_error")
        else:
            return reply.choice("".join(pieces), infos, event[1], delta=False, index=index), event[2]


async def _collect(jobs: list[Job], reply: Reply, state) -> dict:
    """The whole answer (a choice per job, in order), once every job is done; usage counts the prompt once."""
    done = await asyncio.gather(*(_one(job, reply, index) for index, job in enumerate(jobs)))
    state.completion_tokens = sum(tokens for _, tokens in done)
    return reply.body([choice for choice, _ in done], chunk=False, completion_tokens=state.completion_tokens)


async def _merged(jobs: list[Job]):
    """(choice index, event) of every job as the events come, until each job's last event."""
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(index: int, job: Job) -> None:
        while True:
            event = await job.events.get()
            await queue.put((index, event))
            if event[0] != "text":
                return

    tasks = [asyncio.create_task(forward(index, job)) for index, job in enumerate(jobs)]
    try:
        ended = 0
        while ended < len(jobs):
            index, event = await queue.get()
            yield index, event
            ended += event[0] != "text"
    finally:
        for task in tasks:
            task.cancel()


async def _sse(jobs: list[Job], reply: Reply, state):
    """Server-sent events: one chunk per text piece of a choice (with its tokens' logprobs, `index` naming the
    choice), a chunk with each choice's finish reason, the usage chunk when asked for, [DONE]."""

    def send(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    if reply.echo:
        for index in range(len(jobs)):
            yield send(reply.body([reply.choice(reply.echo, [], None, delta=True, index=index)], chunk=True))
    tokens, failed = 0, False
    events = _merged(jobs)
    try:
        async for index, event in events:
            if event[0] == "text":
                yield send(reply.body([reply.choice(event[1], event[2], None, delta=True, index=index)], chunk=True))
            elif event[0] == "error":
                yield send({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                failed = True
                break
            else:
                tokens += event[2]
                yield send(reply.body([reply.choice("", [], event[1], delta=True, index=index)], chunk=True))
    finally:
        await events.aclose()
    state.completion_tokens = tokens
    if reply.include_usage and not failed:
        yield send(reply.body([], chunk=True, completion_tokens=tokens))
    yield "data: [DONE]\n\n"


def add_routes(app: FastAPI, model, tokenizer, cfg: ServerConfig, batcher: Batcher,
               formats: dict[str, PromptFormat], modality: str | None = None) -> None:
    """Register every route on `app`; `formats`: adapter name -> the prompt format it was trained with; `modality`:
    the name the model's modality adapter is served as (a chat with image_url parts goes to it)."""

    def remember_format(name: str, path: str) -> None:
        record = read_record(path)
        if record is None:
            formats.pop(name, None)
            return
        formats[name] = record.prompt
        batcher.stop_ids |= record.prompt.stop_ids(tokenizer)

    def served() -> list[str]:
        return [cfg.base_name, *([modality] if modality else []), *adapter_names(model)]

    def adapter_of(name: str) -> tuple[str, str | None]:
        if name in (cfg.base_name, modality):
            return name, None
        if name not in adapter_names(model):
            raise APIError(404, f"the model {name!r} does not exist; available: {', '.join(served())}", param="model",
                           code="model_not_found")
        return name, name

    async def complete(request: Request, chat: bool):
        check_key(request, cfg)
        checked = parse_request(await read_json(request, cfg), chat)
        name, adapter = adapter_of(checked.model)
        request.state.model = name
        if adapter is not None and any(m.images for m in getattr(checked, "messages", [])):
            raise APIError(400, f"the model {name!r} reads no images; send image_url parts to "
                                f"{modality or cfg.base_name!r}", param="model")
        ids, media = media_prompt_of(checked, tokenizer, formats.get(name if name == modality else adapter),
                                     modality_slots(model))
        request.state.prompt_tokens = len(ids)
        jobs = [make_job(checked, ids, adapter, cfg, media, choice) for choice in range(checked.n)]
        reply = Reply(chat, name, len(ids), logprobs=jobs[0].top_logprobs is not None,
                      echo=checked.prompt if not chat and checked.echo else "",
                      include_usage=checked.stream_options is not None and checked.stream_options.include_usage)
        for job in jobs:
            await batcher.queue.put(job)
        if checked.stream:
            return StreamingResponse(_sse(jobs, reply, request.state), media_type="text/event-stream")
        return await _collect(jobs, reply, request.state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, cfg)
        names = served()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lorakit"}
                                           for n in names]}

    @app.post("/admin/adapters")
    async def load(request: Request):
        check_key(request, cfg, admin=True)
        body = await read_json(request, cfg)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str) or name in (cfg.base_name, modality):
            raise APIError(400, "send {\"name\": NAME, \"path\": ADAPTER_FOLDER}; NAME may not be the base's name",
                           param="name")
        try:
            await asyncio.to_thread(_locked, batcher, add_adapter, model, name, path)
            remember_format(name, path)
        except LorakitError as error:
            raise APIError(400, str(error), param="path") from error
        return {"loaded": name, "models": served()}

    @app.delete("/admin/adapters/{name}")
    async def unload(name: str, request: Request):
        check_key(request, cfg, admin=True)
        if name not in adapter_names(model):
            raise APIError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        await asyncio.to_thread(_locked, batcher, delete_adapter, model, name)
        formats.pop(name, None)
        return {"unloaded": name, "models": served()}

    @app.get("/admin/stats")
    async def stats(request: Request):
        check_key(request, cfg, admin=True)
        s = batcher.stats
        return {"batches": s.batches, "requests": s.requests, "largest_batch": s.largest, "steps": s.steps,
                "row_steps": s.row_steps, "mean_batch": s.row_steps / s.steps if s.steps else None,
                "shared_prompts": s.shared_prompts}


def _locked(batcher: Batcher, function, *args):
    with batcher.exclusive():  # never change adapters while rows are decoding
        return function(*args)
