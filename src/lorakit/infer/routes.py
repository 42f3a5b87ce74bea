"""The HTTP routes of the server (infer/server.py builds the app): OpenAI's completions, chat and models, and admin."""
from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from lorakit.adapters.multi import add_adapter, adapter_names, delete_adapter
from lorakit.errors import LorakitError
from lorakit.infer.batcher import Batcher, Job
from lorakit.infer.api import (APIError, ServerConfig, check_key, completion_id, make_job, now, prompt_ids_of,
                                  read_json)


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    content = {"role": "assistant", "content": text} if text or not delta else {}
    return {"index": 0, key: content, "finish_reason": finish}


async def _collect(job: Job) -> tuple[str, str, int]:
    """All of a job's text, its finish reason and completion tokens."""
    pieces = []
    while True:
        event = await job.events.get()
        if event[0] == "text":
            pieces.append(event[1])
        elif event[0] == "error":
            raise APIError(500, f"generation failed: {event[1]}", type="server_error")
        else:
            return "".join(pieces), event[1], event[2]


async def _sse(job: Job, chat: bool, model_name: str):
    """Server-sent events: one chunk per text piece, a final chunk with the finish reason, [DONE]."""
    ident, created = completion_id(chat), now()
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, finish: str | None) -> str:
        body = {"id": ident, "object": kind, "created": created, "model": model_name,
                "choices": [_choice(chat, text, finish, delta=True)]}
        return f"data: {json.dumps(body)}\n\n"

    while True:
        event = await job.events.get()
        if event[0] == "text":
            yield chunk(event[1], None)
        elif event[0] == "error":
            error = {"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
            break
        else:
            yield chunk("", event[1])
            break
    yield "data: [DONE]\n\n"


def add_routes(app: FastAPI, model, tokenizer, cfg: ServerConfig, batcher: Batcher) -> None:
    """Register every route on `app`."""

    def adapter_of(body: dict) -> tuple[str, str | None]:
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, "model is required: the base model's name or a loaded adapter's", param="model")
        if name == cfg.base_name:
            return name, None
        if name not in adapter_names(model):
            raise APIError(404, f"the model {name!r} does not exist; available: "
                                f"{', '.join([cfg.base_name, *adapter_names(model)])}", param="model",
                           code="model_not_found")
        return name, name

    async def complete(request: Request, chat: bool):
        check_key(request, cfg)
        body = await read_json(request, cfg)
        name, adapter = adapter_of(body)
        ids = prompt_ids_of(body, tokenizer, chat)
        job = make_job(body, ids, adapter, cfg)
        await batcher.queue.put(job)
        if body.get("stream"):
            return StreamingResponse(_sse(job, chat, name), media_type="text/event-stream")
        text, finish, count = await _collect(job)
        return {"id": completion_id(chat), "object": "chat.completion" if chat else "text_completion",
                "created": now(), "model": name, "choices": [_choice(chat, text, finish, delta=False)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, cfg)
        names = [cfg.base_name, *adapter_names(model)]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lorakit"}
                                           for n in names]}

    @app.post("/admin/adapters")
    async def load(request: Request):
        check_key(request, cfg, admin=True)
        body = await read_json(request, cfg)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str) or name == cfg.base_name:
            raise APIError(400, "send {\"name\": NAME, \"path\": ADAPTER_FOLDER}; NAME may not be the base's name",
                           param="name")
        try:
            await asyncio.to_thread(_locked, batcher, add_adapter, model, name, path)
        except LorakitError as error:
            raise APIError(400, str(error), param="path") from error
        return {"loaded": name, "models": [cfg.base_name, *adapter_names(model)]}

    @app.delete("/admin/adapters/{name}")
    async def unload(name: str, request: Request):
        check_key(request, cfg, admin=True)
        if name not in adapter_names(model):
            raise APIError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        await asyncio.to_thread(_locked, batcher, delete_adapter, model, name)
        return {"unloaded": name, "models": [cfg.base_name, *adapter_names(model)]}

    @app.get("/admin/stats")
    async def stats(request: Request):
        check_key(request, cfg, admin=True)
        s = batcher.stats
        return {"batches": s.batches, "requests": s.requests, "largest_batch": s.largest}


def _locked(batcher: Batcher, function, *args):
    with batcher.lock:  # never change adapters in the middle of a batch
        return function(*args)
