"""The OpenAI API's requests and errors for the server (infer/server.py): the server's settings,
reading and checking request bodies, the API key, and turning a request into a batcher job.
Every bad request is an APIError: a 4xx with OpenAI's error body."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse

from lorakit.errors import LorakitError
from lorakit.infer.batcher import Job
from lorakit.infer.generate import encode_prompt, has_chat_template
from lorakit.infer.sampling import Sampling
from lorakit.schema import Config, setting


class APIError(Exception):
    """A client error, sent as OpenAI's error body with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerConfig(Config):
    """Server options (the `lorakit serve` flags)."""

    section: ClassVar[str] = "serve"

    base_name: str = setting("base", "The `model` value that selects the base model without an adapter.",
                             nonempty=True)
    api_key: str | None = setting(
        None, "When set, every request needs `Authorization: Bearer <key>`; the admin endpoints always need it.")
    max_body_bytes: int = setting(1_000_000, "Larger request bodies get 413.", ge=1)
    context_length: int = setting(2048, "Prompt tokens + max_tokens may not exceed this.", ge=2)
    window_ms: float = setting(10.0, "How long the batcher waits for more requests before it starts a batch.", ge=0)
    max_batch: int = setting(32, "Most requests in one batch.", ge=1)


async def read_json(request: Request, cfg: ServerConfig) -> dict:
    """The request body as a JSON object, or 413 / 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {cfg.max_body_bytes}",
                       code="request_too_large")
    body = await request.body()
    if len(body) > cfg.max_body_bytes:
        raise APIError(413, f"request body is over the limit of {cfg.max_body_bytes} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def check_key(request: Request, cfg: ServerConfig, *, admin: bool = False) -> None:
    """401 unless the bearer token is the API key (admin endpoints refuse when no key is configured)."""
    if cfg.api_key is None:
        if admin:
            raise APIError(403, "admin endpoints are disabled: start the server with --api-key (or LORAKIT_API_KEY)",
                           type="permission_error", code="admin_disabled")
        return
    if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                       type="authentication_error", code="invalid_api_key")


def _number(body: dict, name: str, default, kind: type, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"{name} must be a {kind.__name__}, got {value!r}", param=name)
    if not low <= value <= high:
        raise APIError(400, f"{name}={value} is out of range [{low}, {high}]", param=name)
    return kind(value)


def parse_sampling(body: dict) -> Sampling:
    """Decoding options of a request (OpenAI names, plus top_k and repetition_penalty)."""
    return Sampling(temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
                    top_k=_number(body, "top_k", 0, int, 0, 1_000_000),
                    repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.01, 100.0))


def make_job(body: dict, prompt_ids: list[int], adapter: str | None, cfg: ServerConfig) -> Job:
    """A Job from a request, or 400 when its numbers or length do not fit."""
    max_tokens = _number(body, "max_tokens", 16, int, 1, cfg.context_length)
    if len(prompt_ids) + max_tokens > cfg.context_length:
        raise APIError(400, f"this model's context is {cfg.context_length} tokens; the prompt has {len(prompt_ids)} "
                            f"and max_tokens is {max_tokens}", param="messages" if "messages" in body else "prompt",
                       code="context_length_exceeded")
    if body.get("n", 1) not in (1, None):
        raise APIError(400, f"n={body.get('n')!r}: this server returns one choice per request (n=1)", param="n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
    try:
        sampling = parse_sampling(body)
    except LorakitError as error:
        raise APIError(400, str(error)) from error
    return Job(prompt_ids, sampling, max_tokens, adapter, seed)


def prompt_ids_of(body: dict, tokenizer, chat: bool) -> list[int]:
    """Token ids of a completion prompt or of a chat's messages (chat template when there is one)."""
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", param="prompt")
        return list(tokenizer(prompt)["input_ids"])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in messages):
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if not has_chat_template(tokenizer):
        return encode_prompt(tokenizer, "\n".join(m["content"] for m in messages), chat=False)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
