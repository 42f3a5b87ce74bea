"""A small async batching queue: requests that arrive within a few milliseconds share one generation.

Each request is a `Job`; a background task takes the first waiting job, collects more for
`window_s` (up to `max_batch`), and runs them as one batch in a worker thread through the
per-row multi-adapter path. Text pieces flow back to each job's asyncio queue as they are made.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from lorakit.adapters.multi import adapter_rows, keep_rows
from lorakit.infer.decode import decode
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
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) ... ("done", finish, n)


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
        streams = [TextStream(self.tokenizer) for _ in batch]

        def send(job: Job, event: tuple) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, event)

        def on_token(row: int, token: int) -> None:
            piece = streams[row].push(token)
            if piece:
                send(batch[row], ("text", piece))

        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            with self.lock, adapter_rows(self.model, [job.adapter for job in batch]):
                new = decode(self.model, [job.prompt_ids for job in batch], [job.sampling for job in batch],
                             max_new_tokens=[job.max_tokens for job in batch], stop_ids=self.stop_ids,
                             pad_id=self.pad_id, seeds=[job.seed for job in batch], on_token=on_token,
                             on_shrink=lambda kept: keep_rows(self.model, kept))
        except Exception as error:  # the server keeps serving; each waiting request gets the error
            for job in batch:
                send(job, ("error", str(error)))
            return
        for job, tokens, stream in zip(batch, new, streams):
            if piece := stream.flush():
                send(job, ("text", piece))
            finish = "length" if len(tokens) >= job.max_tokens else "stop"
            send(job, ("done", finish, len(tokens)))
