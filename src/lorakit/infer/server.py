"""An OpenAI-compatible HTTP API for one base model and its named LoRA adapters (FastAPI).

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models                                   (the base model and every loaded adapter)
    POST /admin/adapters {"name", "path"}, DELETE /admin/adapters/{name}   (API key required)

The request's `model` picks the adapter (or the base, by its name); a chat's image_url parts (data URLs) go to
the modality adapter, if one is loaded, whose LoRA and soft tokens reach that request's row only. Concurrent requests are
batched (infer/batcher.py) through the per-row multi-adapter path. Every bad request gets a 4xx
with OpenAI's error body {"error": {"message", "type", "param", "code"}} and the server goes on.

OpenAI's semantics: `stop` (up to 4 strings) ends a row at the first one in its text, which is cut
before it (finish_reason "stop"; streaming holds back text that might begin one); `logprobs` are
log_softmax of the model's raw logits (before repetition penalty, temperature, top-k/top-p) at each
generated token; completions' `echo` puts the prompt text first (not with logprobs: a 400). A
request argument the server does not implement, such as `echo` on chat, is a 400
("unrecognized request argument"), as on OpenAI's API, never silently ignored.

Every request is logged once, when its response has been sent, on the "lorakit.serve" logger at
INFO: method and path, model, status, prompt and completion tokens, milliseconds.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lorakit.infer.api import APIError, ServerConfig
from lorakit.infer.batcher import Batcher
from lorakit.data.prompting import PromptFormat
from lorakit.infer.generate import stop_token_ids
from lorakit.infer.routes import add_routes

log = logging.getLogger("lorakit.serve")


class RequestLog:
    """ASGI middleware: one log line per request once its last body byte is sent (a stream's too), with
    the model and token counts the route left on `request.state`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, logged = time.perf_counter(), 500, False
        state = scope.setdefault("state", {})  # what request.state writes to

        def write() -> None:
            nonlocal logged
            logged = True
            log.info("%s %s model=%s status=%d prompt_tokens=%s completion_tokens=%s ms=%.1f", scope["method"],
                     scope["path"], state.get("model", "-"), status, state.get("prompt_tokens", "-"),
                     state.get("completion_tokens", "-"), 1000 * (time.perf_counter() - start))

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write()

        try:
            await self.app(scope, receive, sending)
        finally:
            if not logged:  # an exception, or a client that went away mid-stream
                write()


def create_app(model, tokenizer, cfg: ServerConfig, formats: dict[str | None, PromptFormat] | None = None,
               modality: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (plus the named adapters added to it); `formats`: adapter name (None: the
    base, e.g. a full fine-tuning run's model) -> the prompt format it was trained with (its lorakit_run.json),
    applied to its chat requests; `modality`: the name the model's modality adapter (load_adapter'ed onto it) is
    served as: chats with image_url parts (data URLs) go to it, text rows never do."""
    formats = dict(formats or {})
    stops = stop_token_ids(tokenizer, model).union(*(f.stop_ids(tokenizer) for f in formats.values()))
    batcher = Batcher(model, tokenizer, stops, window_s=cfg.window_ms / 1000, max_batch=cfg.max_batch)

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(batcher.run_forever())
        yield
        task.cancel()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.batcher, app.state.cfg = batcher, cfg

    @app.exception_handler(APIError)
    async def _api_error(_request, error: APIError):
        return error.response()

    @app.exception_handler(404)
    async def _not_found(request, _error):
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    app.add_middleware(RequestLog)
    add_routes(app, model, tokenizer, cfg, batcher, formats, modality)
    return app
