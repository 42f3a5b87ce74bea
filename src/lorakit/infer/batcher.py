"""Continuous batching for the server: requests join the running batch between decoding steps.

Each request is a `Job`. A background task takes the first waiting job, collects more for
`window_s` (up to `max_batch`), and starts them in a worker thread; while that batch decodes, newly
queued jobs are handed to the worker, which admits them between two steps (up to `max_batch` rows
decoding at once): the shortest waiting prompts of similar length are run (one padded prefill per
step, so little is padding and a long prompt does not hold back short ones) and their KV cache is
merged into the running batch's, left-padded, so a new request never waits for the others to
finish. Rows that finish leave at once, and cache columns that only padding holds are dropped.
Every row goes through the per-row multi-adapter path with its own adapter, sampling options, seed
and budget (and its images, if any, through the modality adapter: adapters/modality.py's `media_rows`),
so a row's text does not depend on which rows share its steps. (Models whose KV cache
is not a plain one per layer, e.g. sliding-window layers, run each batch to its end before the next
starts.) The steps are decoding/decode.py's: its forward, token choice and logprobs.

Text pieces flow back to each job's asyncio queue as they are made; a job's stop strings end its
row, and text that might begin a stop string is held back until it is known not to (so nothing
sent is ever cut later).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from lorakit.adapters.modality import keep_media_rows, media_rows
from lorakit.adapters.multi import adapter_rows, keep_rows
from lorakit.decoding.decode import (TokenLogprobs, _forward, _forward_kwargs, choose_tokens, first_of_each, left_pad,
                                     token_logprobs)
from lorakit.infer.generate import TextStream
from lorakit.decoding.sampling import Sampling
from lorakit.media import MediaItem


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
    media: list[MediaItem] | None = None  # the items (images) a modality adapter reads for this row
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
    batches: int = 0  # groups of requests started together (a prefill each)
    requests: int = 0
    largest: int = 0  # most rows decoding at once
    steps: int = 0  # decoding steps (one forward of every running row)
    row_steps: int = 0  # rows summed over steps: row_steps / steps is the mean batch
    shared_prompts: int = 0  # rows that took a copy of an equal row's prompt pass (n > 1, repeated prompts)


PREFILL_PADDING = 1.25  # a prefill group's padded tokens may be this many times its real ones
PREFILL_TOKENS = 4096  # and at most this many (padded) tokens


def prefill_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of `prompts` in groups of similar length (one padded forward each), shortest first."""
    groups: list[list[int]] = []
    real = 0
    for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        size = len(prompts[index])
        if groups and (size * (len(groups[-1]) + 1) <= PREFILL_PADDING * (real + size)
                       and size * (len(groups[-1]) + 1) <= PREFILL_TOKENS):
            groups[-1].append(index)
            real += size
        else:
            groups.append([index])
            real = size
    return groups


def mergeable(cache) -> bool:
    """True when rows can join and leave `cache` freely: one plain (non-sliding) key/value tensor pair per layer."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _left_pad_time(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(B, ..., T, D) -> (B, ..., width, D), zeros on the left of the time axis."""
    missing = width - tensor.shape[-2]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, missing, 0))


class _Row:
    """One job's decoding state in the running batch."""

    def __init__(self, job: Job, text: RowText) -> None:
        self.job, self.text = job, text
        self.seen = list(job.prompt_ids)  # for the repetition penalty
        self.new: list[int] = []
        self.generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None


class _Running:
    """The rows decoding together: their KV cache, attention mask (B, W), last positions (B, 1), next-token logits."""

    def __init__(self, rows: list[_Row], cache, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor):
        self.rows, self.cache, self.mask, self.positions, self.logits = rows, cache, mask, positions, logits

    def merge(self, other: "_Running") -> None:
        """Append `other`'s rows: both caches and masks left-padded to the wider of the two."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad_time(mine.keys, width), _left_pad_time(theirs.keys, width)])
            mine.values = torch.cat([_left_pad_time(mine.values, width), _left_pad_time(theirs.values, width)])
        pad = lambda mask: torch.nn.functional.pad(mask, (width - mask.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(other.mask)])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows

    def keep(self, kept: list[int]) -> None:
        index = torch.tensor(kept, device=self.mask.device)
        self.cache.reorder_cache(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.rows = [self.rows[i] for i in kept]

    def trim(self) -> None:
        """Drop the leading cache columns that are padding in every row (the longest rows have left)."""
        start = int(self.mask.any(dim=0).long().argmax())
        if start > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]


class Batcher:
    """Runs queued jobs in continuous batches on one model (the model lock also guards adapter loading)."""

    def __init__(self, model, tokenizer, stop_ids: set[int], *, window_s: float = 0.01, max_batch: int = 32):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.window_s, self.max_batch = window_s, max_batch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lock = threading.Lock()
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.stats = BatchStats()
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()  # jobs handed to the running worker
        self.mergeable: bool | None = None  # whether this model's KV cache lets rows join (known after a prefill)
        self._pausers = 0  # admin operations waiting for the running batch to drain
        self._pause_guard = threading.Lock()

    @contextmanager
    def exclusive(self):
        """The model to oneself (adapter loading): new rows stop joining, the running ones finish, then the block
        runs."""
        with self._pause_guard:
            self._pausers += 1
        try:
            with self.lock:
                yield
        finally:
            with self._pause_guard:
                self._pausers -= 1

    def _drain_inbox(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self.inbox.get_nowait())
            except queue.Empty:
                return jobs

    async def run_forever(self) -> None:
        """Collect a first batch, start it, and hand it every job queued while it runs; until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = self._drain_inbox() or [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            worker = asyncio.ensure_future(asyncio.to_thread(self._serve, batch, loop))
            while not worker.done():
                getter = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({worker, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    self.inbox.put(getter.result())  # the worker admits it, or the next batch starts with it
                else:
                    getter.cancel()
            worker.result()

    # --- the worker thread ------------------------------------------------------------------------

    def _serve(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        """Decode `batch` and every job that arrives before the last row ends (or an adapter change waits)."""
        def send(job: Job, event: tuple) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, event)

        waiting = deque(batch)
        self._acquire()
        try:
            with torch.no_grad(), ExitStack() as routing:
                running: _Running | None = None
                while True:
                    paused = self._pausers > 0  # an adapter change waits: no new rows, the running ones finish
                    if not paused:
                        waiting.extend(self._drain_inbox())
                    room = self.max_batch - (len(running.rows) if running else 0)
                    if waiting and not paused and room > 0 and (running is None or self.mergeable):
                        jobs = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                        running, left = self._admit(running, jobs, routing, send)
                        waiting.extendleft(reversed(left))
                    if running is None:
                        if waiting and not paused:
                            continue
                        break
                    running = self._step(running, routing, send)
        finally:
            self.lock.release()
        for job in waiting:  # the next batch starts with them
            self.inbox.put(job)

    def _acquire(self) -> None:
        """The model lock, after any adapter change that is waiting for it."""
        while True:
            self.lock.acquire()
            if self._pausers == 0:
                return
            self.lock.release()
            time.sleep(0.005)

    def _admit(self, running: _Running | None, jobs: list[Job], routing: ExitStack, send
               ) -> tuple[_Running | None, list[Job]]:
        """Prefill the shortest of `jobs` of similar length (one padded forward) and add their rows to the running
        batch; (the batch, the jobs left for the next step: a long prompt's prefill does not hold back the first
        tokens of the short ones, and the running rows step between two prefills)."""
        if self.mergeable is False:
            chosen, left = jobs, []  # rows that cannot join later start together
        else:
            first = set(prefill_groups([job.prompt_ids for job in jobs])[0])
            chosen = [job for i, job in enumerate(jobs) if i in first]
            left = [job for i, job in enumerate(jobs) if i not in first]
        device = next(self.model.parameters()).device
        firsts, inverse = first_of_each([(tuple(job.prompt_ids), job.adapter) if job.media is None else id(job)
                                         for job in chosen])  # a row with images is always its own
        distinct = [chosen[row] for row in firsts]
        try:
            with adapter_rows(self.model, [job.adapter for job in distinct]), \
                    media_rows(self.model, [job.media for job in distinct]):  # the prompt pass takes their images
                ids, mask = left_pad([job.prompt_ids for job in distinct], self.pad_id)
                ids, mask = ids.to(device), mask.to(device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits, cache = _forward(self.model, ids, mask, positions, None, _forward_kwargs(self.model))
                if len(distinct) < len(chosen):  # each equal row gets a copy of its prompt pass
                    index = torch.tensor(inverse, device=device)
                    logits, mask, positions = logits[index], mask[index], positions[index]
                    cache.reorder_cache(index)
        except Exception as error:  # the server keeps serving; these requests get the error
            for job in chosen:
                send(job, ("error", str(error)))
            return running, left
        self.stats.shared_prompts += len(chosen) - len(distinct)
        self.stats.batches += 1
        self.stats.requests += len(chosen)
        if self.mergeable is None:
            self.mergeable = mergeable(cache)
        joining = _Running([_Row(job, RowText(self.tokenizer, job.stop)) for job in chosen], cache, mask,
                           positions[:, -1:], logits)
        if running is None:
            running = joining
        else:
            running.merge(joining)
        routing.close()  # the rows' adapters (and modality routes), in their new order
        routing.enter_context(adapter_rows(self.model, [row.job.adapter for row in running.rows]))
        routing.enter_context(media_rows(self.model, [row.job.media for row in running.rows]))
        self.stats.largest = max(self.stats.largest, len(running.rows))
        return running, left

    def _step(self, running: _Running, routing: ExitStack, send) -> _Running | None:
        """Choose every row's next token, send its text, let finished rows leave, and run the next forward."""
        rows = running.rows
        try:
            chosen = choose_tokens(running.logits, [r.seen for r in rows], [r.job.sampling for r in rows],
                                   [r.generator for r in rows], [False] * len(rows))
            asked = [i for i, row in enumerate(rows) if row.job.top_logprobs is not None]
            stats = dict(zip(asked, token_logprobs(running.logits[asked], [chosen[i] for i in asked],
                                                   [rows[i].job.top_logprobs for i in asked]))) if asked else {}
            step = torch.full((len(rows), 1), self.pad_id, dtype=torch.long)
            done = [False] * len(rows)
            for i, row in enumerate(rows):
                token = step[i, 0] = chosen[i]
                if token in self.stop_ids:
                    done[i] = True
                    continue
                row.new.append(token)
                row.seen.append(token)
                piece, infos = row.text.push(token, stats.get(i))
                if piece or infos:
                    send(row.job, ("text", piece, infos))
                done[i] = row.text.stopped or len(row.new) >= row.job.max_tokens
            for i, row in enumerate(rows):
                if done[i]:
                    self._finish(row, send)
            kept = [i for i in range(len(rows)) if not done[i]]
            if not kept:
                routing.close()
                return None
            if len(kept) < len(rows):
                running.keep(kept)
                keep_rows(self.model, kept)
                keep_media_rows(self.model, kept)
                step = step[kept]
                if self.mergeable:
                    running.trim()
            running.mask = torch.cat([running.mask, torch.ones_like(running.mask[:, :1])], dim=1)
            running.positions = running.positions + 1
            self.stats.steps += 1
            self.stats.row_steps += len(running.rows)
            running.logits, running.cache = _forward(self.model, step.to(running.mask.device), running.mask,
                                                     running.positions, running.cache, _forward_kwargs(self.model))
            return running
        except Exception as error:  # the server keeps serving; the rows in flight get the error
            for row in running.rows:
                send(row.job, ("error", str(error)))
            routing.close()
            return None

    def _finish(self, row: _Row, send) -> None:
        piece, infos = row.text.finish()
        if piece or infos:
            send(row.job, ("text", piece, infos))
        finish = "stop" if row.text.stopped or len(row.new) < row.job.max_tokens else "length"
        send(row.job, ("done", finish, len(row.new)))
