"""An OpenAI-compatible HTTP API for one base model and its named LoRA adapters (FastAPI).

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models                                   (the base model and every loaded adapter)
    POST /admin/adapters {"name", "path"}, DELETE /admin/adapters/{name}   (API key required)

The request's `model` picks the adapter (or the base, by its name). Concurrent requests are
batched (infer/batcher.py) through the per-row multi-adapter path. Every bad request gets a 4xx
with OpenAI's error body {"error": {"message", "type", "param", "code"}} and the server goes on.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lorakit.infer.api import APIError, ServerConfig
from lorakit.infer.batcher import Batcher
from lorakit.infer.generate import stop_token_ids
from lorakit.infer.routes import add_routes


def create_app(model, tokenizer, cfg: ServerConfig) -> FastAPI:
    """The FastAPI app serving `model` (plus the named adapters added to it)."""
    batcher = Batcher(model, tokenizer, stop_token_ids(tokenizer, model), window_s=cfg.window_ms / 1000,
                      max_batch=cfg.max_batch)

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

    add_routes(app, model, tokenizer, cfg, batcher)
    return app
