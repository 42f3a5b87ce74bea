"""The OpenAI API's requests and errors for the server (infer/server.py): the server's settings,
reading request bodies and checking them against one pydantic model per endpoint, the API key,
and turning a request into a batcher job. Every bad request is an APIError: a 4xx with OpenAI's
error body naming the param (never FastAPI's 422)."""
from __future__ import annotations

import json
import reprlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from lorakit.data.chat import content_text
from lorakit.data.media import decode_item
from lorakit.data.prompting import PromptFormat
from lorakit.errors import LorakitError
from lorakit.infer.batcher import Job
from lorakit.infer.generate import CHAT
from lorakit.decoding.sampling import Sampling
from lorakit.media import MediaItem, MediaSlot
from lorakit.schema import Config, setting

_SHOWN = reprlib.Repr()  # a bad value as quoted in an error message
MAX_CHOICES = 128  # n: choices one request may ask for
_SHOWN.maxstring = _SHOWN.maxother = 80


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
    """The request body as a JSON object, or 413 / 400.

    The body is read as it streams in and reading stops at the first chunk past the limit, so a body
    without a Content-Length (chunked) never holds more than the limit plus one chunk in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {cfg.max_body_bytes}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cfg.max_body_bytes:
            raise APIError(413, f"request body is over the limit of {cfg.max_body_bytes} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
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


class _Strict(BaseModel):
    # strict: no "1" for 1 or true for 1; extra: an argument this server does not implement is a 400
    # ("Unrecognized request argument supplied", as OpenAI's API answers), never silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Request(_Strict):
    """The fields both endpoints take (OpenAI's names, plus lorakit's top_k and repetition_penalty).
    A null value means the field is unset."""

    model: str
    max_tokens: int = Field(16, ge=1)  # at most the context length (checked in make_job)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices per request: choice i samples with seed + i (seed given)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: tuple[str, ...] = ()  # a string or up to 4 (non-empty) strings
    presence_penalty: float = 0.0  # accepted at 0 only (repetition_penalty is this server's penalty)
    frequency_penalty: float = 0.0
    user: str | None = None  # OpenAI's end-user id: meaning nothing to the generation

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"must be a string or a list of up to 4 strings, got {_SHOWN.repr(stop)}")
        if "" in stops:
            raise ValueError("stop strings may not be empty")
        return tuple(stops)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError(f"not supported (only 0), got {value}; use repetition_penalty")
        return value

    def budget(self) -> tuple[str, int]:
        """The token budget and the param that set it."""
        return "max_tokens", self.max_tokens

    def top_alternatives(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the k most likely tokens."""
        return None


def image_urls(content) -> list[tuple[int, str]]:
    """(part index, URL) of each image_url part of a message's content (a list of OpenAI's parts), checked."""
    urls = []
    for index, part in enumerate(content if isinstance(content, list) else []):
        if not isinstance(part, dict) or part.get("type") != "image_url":
            continue
        image = part.get("image_url")
        if set(part) != {"type", "image_url"} or not isinstance(image, dict) or not isinstance(image.get("url"), str) \
                or not set(image) <= {"url", "detail"}:
            raise ValueError(f"part {index} must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": STRING}}}}")
        urls.append((index, image["url"]))
    return urls


def text_of_content(content):
    """A message's content: a string, or OpenAI's list of text and image_url parts, joined in order by newlines,
    each image as the `<image>` placeholder its soft tokens take (data/chat.py's rule, as training renders
    TRL's content parts); the images themselves go to a modality adapter (`ChatMessage.images`)."""
    if not isinstance(content, list):
        return content
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image_url"):
            raise ValueError(f"part {index} has type {_SHOWN.repr(kind)}: only text and image_url parts are supported")
        if kind == "text" and (not isinstance(part.get("text"), str) or set(part) != {"type", "text"}):
            raise ValueError(f"part {index} must be {{\"type\": \"text\", \"text\": STRING}}")
    image_urls(content)
    return content_text(content, "content", image_part="image_url")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str  # a string or a list of text and image_url parts
    _images: list[tuple[int, str]] = PrivateAttr(default_factory=list)  # (part index, URL) of its image_url parts

    content_as_text = field_validator("content", mode="before")(text_of_content)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_images(cls, data, handler):
        message = handler(data)
        if isinstance(data, dict):
            message._images = image_urls(data.get("content"))
        return message

    @property
    def images(self) -> list[tuple[int, str]]:
        """(part index, URL) of the message's image_url parts, in order."""
        return self._images


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs=true

    def budget(self) -> tuple[str, int]:
        if self.max_completion_tokens is None:
            return "max_tokens", self.max_tokens
        return "max_completion_tokens", self.max_completion_tokens

    def top_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str  # or a list holding one string
    echo: bool = False  # the prompt text before the completion
    logprobs: int | None = Field(None, ge=0, le=5)  # the number of most likely tokens beside the chosen one

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("must be a non-empty string (or a list of one)")
        return prompt

    def top_alternatives(self) -> int | None:
        return self.logprobs


def _param(location: tuple) -> str | None:
    """A pydantic error location as the API's param: ('messages', 0, 'content') -> messages[0].content."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location).lstrip(".") or None


def _problem(problem: dict) -> APIError:
    param = _param(problem["loc"])
    if problem["type"] == "missing":
        message = f"missing required parameter: {param!r}"
    elif problem["type"] == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param!r} (this server does not implement it)"
    elif problem["type"] == "value_error":
        message = f"{param}: {problem['ctx']['error']}"
    else:
        message = f"{param}: {problem['msg'][:1].lower()}{problem['msg'][1:]}, got {_SHOWN.repr(problem['input'])}"
    return APIError(400, message, param=param)


def parse_request(body: dict, chat: bool) -> ChatRequest | CompletionRequest:
    """The request body checked against the endpoint's model, or 400 naming the first bad param."""
    try:
        request = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as error:
        raise _problem(error.errors()[0]) from None
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if {"max_tokens", "max_completion_tokens"} <= request.model_fields_set:
            raise APIError(400, "set max_completion_tokens or max_tokens, not both", param="max_tokens")
    elif request.echo and request.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (the prompt tokens' logprobs are not computed)",
                       param="echo")
    return request


def make_job(request: ChatRequest | CompletionRequest, prompt_ids: list[int], adapter: str | None,
             cfg: ServerConfig, media: list[MediaItem] | None = None, choice: int = 0) -> Job:
    """A Job from a checked request (its choice `choice` of n: a given seed + choice), or 400 when its length does
    not fit the context."""
    name, max_tokens = request.budget()
    if max_tokens > cfg.context_length:
        raise APIError(400, f"{name}={max_tokens} is over this model's context of {cfg.context_length} tokens",
                       param=name)
    if len(prompt_ids) + max_tokens > cfg.context_length:
        raise APIError(400, f"this model's context is {cfg.context_length} tokens; the prompt has {len(prompt_ids)} "
                            f"and {name} is {max_tokens}",
                       param="messages" if isinstance(request, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    try:
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                            repetition_penalty=request.repetition_penalty)
    except LorakitError as error:
        raise APIError(400, str(error)) from error
    seed = request.seed if request.seed is None or choice == 0 else (request.seed + choice) % 2**64
    return Job(prompt_ids, sampling, max_tokens, adapter, seed, stop=request.stop,
               top_logprobs=request.top_alternatives(), media=media or None)


def prompt_ids_of(request: ChatRequest | CompletionRequest, tokenizer, prompt_format: PromptFormat | None = None
                  ) -> list[int]:
    """The one place a request becomes prompt ids: a completion's prompt as it is (OpenAI's meaning: raw text);
    a chat's messages in the prompt format the adapter was trained with (its lorakit_run.json), else through
    the tokenizer's chat template (lorakit's built-in one when it has none, as `--chat` everywhere)."""
    if isinstance(request, CompletionRequest):
        return list(tokenizer(request.prompt)["input_ids"])
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    if prompt_format is not None:
        try:
            return prompt_format.messages_ids(tokenizer, messages)
        except LorakitError as error:
            raise APIError(400, str(error), param="messages") from error
    return CHAT.messages_ids(tokenizer, messages)  # the tokenizer's chat template, or lorakit's built-in one


def media_prompt_of(request: ChatRequest | CompletionRequest, tokenizer, prompt_format: PromptFormat | None,
                    slots: dict[str, MediaSlot]) -> tuple[list[int], list[MediaItem]]:
    """`prompt_ids_of`, and for a chat whose messages hold image_url parts the items a modality adapter reads
    (`slots`: the model's `modality_slots`): each data URL decoded, its soft tokens where its part was. Any
    problem with an image is a 400 naming its part."""
    images = [(f"messages[{m}].content[{p}].image_url", url) for m, message in
              enumerate(getattr(request, "messages", [])) for p, url in message.images]
    if not images:
        return prompt_ids_of(request, tokenizer, prompt_format), []
    if "image" not in slots:
        raise APIError(400, "an 'image_url' part needs a modality adapter that reads images (method: modality); this "
                            "model has none", param=images[0][0].rpartition("[")[0])
    items = []
    for param, url in images:
        if not url.startswith("data:"):
            raise APIError(400, "only data URLs (data:image/png;base64,...) are accepted: this server fetches nothing",
                           param=param)
        try:
            items.append(decode_item(url, slots["image"], Path.cwd(), "the image"))
        except LorakitError as error:
            raise APIError(400, str(error), param=param) from error
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    try:
        ids, spans = (prompt_format or CHAT).media_ids(tokenizer, messages, {"image": slots["image"]})
    except LorakitError as error:
        raise APIError(400, str(error), param="messages") from error
    if len(spans) != len(items):
        raise APIError(400, f"the prompt holds {len(spans)} of the {len(items)} images (the adapter's prompt format "
                            "reads the last user message only)", param="messages")
    return ids, [(modality, start, item) for (modality, start), item in zip(spans, items)]


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
