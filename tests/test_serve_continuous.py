"""Continuous batching in the server's batcher (infer/batcher.py): requests that arrive while a batch decodes
join it between two steps, and every row answers what it answers alone; models whose KV cache rows cannot
join (sliding-window layers) still answer right, one whole batch after another."""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from lorakit.infer.batcher import PREFILL_PADDING, Batcher, Job, mergeable, prefill_groups
from lorakit.decoding.sampling import Sampling
from lorakit.models import load_model, load_tokenizer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def embedded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("embedded").eval(), load_tokenizer("embedded")
    torch.set_num_threads(threads)


def _jobs(tokenizer) -> list[Job]:
    prompts = ["Question: Where is Lima?\nAnswer:", "The capital of France is",
               "Once upon a time, in a land far away, there lived a king who had three daughters and",
               "Question: What is the largest planet?\nAnswer:"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    return [Job(ids[0], Sampling(), 40, None, top_logprobs=2),
            Job(ids[1], Sampling(temperature=0.8), 9, None, seed=3),
            Job(ids[2], Sampling(), 14, None, stop=("Europe",)),
            Job(ids[3], Sampling(repetition_penalty=1.3), 11, None, top_logprobs=0)]


def _run(model, tokenizer, waves: list[list[Job]], *, after_first_text: bool) -> tuple[list[tuple], Batcher]:
    """Queue each wave of jobs: the next one once the wave's first job has sent text (its batch is decoding), or
    once every job of the wave is done; per job (text, finish event, [logprob])."""
    async def run():
        batcher = Batcher(model, tokenizer, set(), window_s=0.001)  # no stop ids: rows run to their budgets
        task = asyncio.create_task(batcher.run_forever())

        async def collect(job: Job, started: asyncio.Event) -> tuple:
            text, logprobs = "", []
            while (event := await job.events.get())[0] == "text":
                text, logprobs = text + event[1], logprobs + [i.logprob for i in event[2]]
                started.set()
            return text, event, logprobs

        pending = []
        for wave in waves:
            started = asyncio.Event()
            for job in wave:
                batcher.queue.put_nowait(job)
            tasks = [asyncio.create_task(collect(job, started if n == 0 else asyncio.Event()))
                     for n, job in enumerate(wave)]
            await (started.wait() if after_first_text else asyncio.gather(*tasks))
            pending += tasks
        results = await asyncio.gather(*pending)
        task.cancel()
        return results, batcher
    return asyncio.run(run())


def test_rows_that_join_a_running_batch_answer_as_alone(embedded):
    model, tokenizer = embedded
    make = lambda: _jobs(tokenizer)  # noqa: E731
    alone, _ = _run(model, tokenizer, [[job] for job in make()], after_first_text=False)
    jobs = make()
    grad_modes = []
    hook = model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    try:
        joined, batcher = _run(model, tokenizer, [jobs[:1], jobs[1:]], after_first_text=True)
    finally:
        hook.remove()
    assert grad_modes and not any(grad_modes)  # no autograd graph: it would keep every step's activations alive
    assert batcher.mergeable is True
    assert batcher.stats.largest == 4  # the three later jobs joined the first while it decoded
    assert batcher.stats.requests == 4 and batcher.stats.steps < sum(r[1][2] for r in alone)
    for together, single in zip(joined, alone):
        assert together[:2] == single[:2]
        assert together[2] == pytest.approx(single[2], abs=1e-4)  # padding in the batch: fp32 sums reordered
    assert joined[0][1] == ("done", "length", 40) and joined[2][1][1] == "stop"


def test_prefill_groups_keep_padding_small():
    prompts = [[0] * n for n in (300, 5, 7, 290, 6, 40, 310, 8)]
    groups = prefill_groups(prompts)
    assert sorted(i for group in groups for i in group) == list(range(len(prompts)))
    for group in groups:
        lengths = [len(prompts[i]) for i in group]
        assert max(lengths) * len(lengths) <= PREFILL_PADDING * sum(lengths)
    assert [sorted(len(prompts[i]) for i in group) for group in groups] == [[5, 6, 7, 8], [40], [290, 300, 310]]


def test_a_sliding_window_model_answers_in_whole_batches(embedded):
    _, tokenizer = embedded
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    cache = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    assert not mergeable(cache)
    alone, _ = _run(model, tokenizer, [[job] for job in _jobs(tokenizer)], after_first_text=False)
    jobs = _jobs(tokenizer)
    later, batcher = _run(model, tokenizer, [jobs[:1], jobs[1:]], after_first_text=True)
    assert batcher.mergeable is False and batcher.stats.largest == 3  # the later jobs waited, then ran together
    for together, single in zip(later, alone):
        assert together[:2] == single[:2]


def test_an_adapter_change_waits_for_the_rows_in_flight(embedded):
    model, tokenizer = embedded
    seen: dict[str, int] = {}

    async def run():
        batcher = Batcher(model, tokenizer, set(), window_s=0.001)
        task = asyncio.create_task(batcher.run_forever())
        job = _jobs(tokenizer)[0]
        batcher.queue.put_nowait(job)
        await job.events.get()  # its batch is decoding

        def change():
            with batcher.exclusive():
                seen["steps at the change"] = batcher.stats.steps

        changing = asyncio.create_task(asyncio.to_thread(change))
        while (event := await job.events.get())[0] == "text":
            pass
        await changing
        seen["steps of the job"] = batcher.stats.steps
        later = _jobs(tokenizer)[1]  # the server goes on after the change
        batcher.queue.put_nowait(later)
        while (last := await later.events.get())[0] == "text":
            pass
        task.cancel()
        return event, last

    event, last = asyncio.run(run())
    assert seen["steps at the change"] == seen["steps of the job"] == 39  # 40 tokens: a prefill and 39 steps
    assert event == ("done", "length", 40) and last == ("done", "length", 9)
