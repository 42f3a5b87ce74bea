"""A small async batching queue: requests that arrive within a few milliseconds share one generation.

Each request is a `Job`; a background task takes the first waiting job, collects more for
`window_s` (up to `max_batch`), and runs them as one batch in a worker thread through the
per-row multi-adapter path. Text pieces flow back to each job's asyncio queue as they are made;
a job's stop strings end its row, and text that might begin a stop string is held back until it
is known not to (so nothing sent is ever cut later).
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from lorakit.adapters.multi import adapter_rows, keep_rows
from lorakit.infer.decode import TokenLogprobs, decode
from lorakit.infer.generate import TextStream
from lorakit.infer.sampling import Sampling


@dataclass
class Job:
    """One request's generation: its prompt ids, options, adapter, and where its text goes."""

    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    adapter: str | None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the row ends at the first of these in its text, which is cut before it
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    # ("text", str, [TokenLogprob]) ... then ("done", finish_reason, completion_tokens) or ("error", message)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob for the API: token texts as `tokenizer.decode([id])` spells them (a
    token holding part of a multi-byte character shows U+FFFD), `offset` its first character's in the text."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int


def held_back(text: str, start: int, stops: tuple[str, ...]) -> int:
    """How many characters at the end of text[start:] could be the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class RowText:
    """One row's output as tokens arrive: the text (TextStream), cut at the first stop string, and the
    logprobs of the tokens that begin in the text released so far (after a cut: those that begin before it)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops, self.stream = tokenizer, stops, TextStream(tokenizer)
        self.text, self.sent, self.stopped = "", 0, False
        self.pending: list[TokenLogprob] = []

    def push(self, token: int, logprobs: TokenLogprobs | None) -> tuple[str, list[TokenLogprob]]:
        """The new text that is safe to send, and the logprobs that go with it."""
        if logprobs is not None:
            spell = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
            self.pending.append(TokenLogprob(spell(token), logprobs.logprob,
                                             [(spell(t), lp) for t, lp in logprobs.top], len(self.text)))
        self.text += self.stream.push(token)
        return self._release(final=False)

    def finish(self) -> tuple[str, list[TokenLogprob]]:
        """Everything still held back (nothing after a stop string)."""
        if not self.stopped:
            self.text += self.stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, list[TokenLogprob]]:
        if not self.stopped:
            # a stop string cannot start before `sent`: a possible beginning of one is never sent
            found = [at for stop in self.stops if (at := self.text.find(stop, self.sent)) >= 0]
            if found:
                self.stopped, self.text = True, self.text[:min(found)]
        end = len(self.text) if final or self.stopped else len(self.text) - held_back(self.text, self.sent,
                                                                                     self.stops)
        piece, self.sent = self.text[self.sent:end], end
        released = sum(1 for info in self.pending if info.offset < end or (final and not self.stopped))
        infos, self.pending = self.pending[:released], [] if self.stopped else self.pending[released:]
        return piece, infos


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0


class Batcher:
    """Runs queued jobs in batches on one model (the model lock also guards adapter loading)."""

    def __init__(self, model, tokenizer, stop_ids: set[int], *, window_s: float = 0.01, max_batch: int = 32):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.window_s, self.max_batch = window_s, max_batch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lock = threading.Lock()
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.stats = BatchStats()

    async def run_forever(self) -> None:
        """Collect and run batches until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            await asyncio.to_thread(self._generate, batch, loop)

    def _generate(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        rows = [RowText(self.tokenizer, job.stop) for job in batch]
        logprobs: list[TokenLogprobs | None] = [None] * len(batch)  # of each row's token being chosen

        def send(job: Job, event: tuple) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, event)

        def on_logprobs(row: int, stats: TokenLogprobs) -> None:
            logprobs[row] = stats

        def on_token(row: int, token: int) -> bool:
            piece, infos = rows[row].push(token, logprobs[row])
            if piece or infos:
                send(batch[row], ("text", piece, infos))
            return rows[row].stopped

        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            with self.lock, adapter_rows(self.model, [job.adapter for job in batch]):
                new = decode(self.model, [job.prompt_ids for job in batch], [job.sampling for job in batch],
                             max_new_tokens=[job.max_tokens for job in batch], stop_ids=self.stop_ids,
                             pad_id=self.pad_id, seeds=[job.seed for job in batch], on_token=on_token,
                             on_shrink=lambda kept: keep_rows(self.model, kept),
                             top_logprobs=[job.top_logprobs for job in batch], on_logprobs=on_logprobs)
        except Exception as error:  # the server keeps serving; each waiting request gets the error
            for job in batch:
                send(job, ("error", str(error)))
            return
        for job, tokens, row in zip(batch, new, rows):
            piece, infos = row.finish()
            if piece or infos:
                send(job, ("text", piece, infos))
            finish = "stop" if row.stopped or len(tokens) < job.max_tokens else "length"
            send(job, ("done", finish, len(tokens)))
