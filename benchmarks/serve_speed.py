"""`lorakit serve` against transformers' own OpenAI-compatible server (`transformers serve`), same model, same load.

    python benchmarks/serve_speed.py --threads 1 --out benchmarks/results/serve-speed-1thread.json
    python benchmarks/serve_speed.py --quick            # tiny model, 16 requests: a smoke run in well under a minute

One model folder is built offline from a config (SmolLM2-135M's shape, random weights, lorakit's
byte BPE tokenizer with a ChatML chat template, saved as safetensors in `--dtype`) and both
servers load that folder, each started as a subprocess on 127.0.0.1 with the same dtype and the
same number of torch threads (OMP_NUM_THREADS/MKL_NUM_THREADS=--threads). Each is warmed up with a
few untimed requests, then the same request list (64 by default, deterministic from --seed) runs
at each concurrency (1, 8 and 32 closed-loop clients: a client sends its next request when its
last one is answered), and the server is stopped.

The workload mixes chat and completion requests, short (8-40 tokens) and long (200-400 tokens)
prompts, max_tokens from 16 to 128 and streaming / non-streaming about half each, all greedy
(temperature 0). The model's output rows for the special tokens, and for ids past the tokenizer's
vocabulary (the model keeps SmolLM2's 49152), are zero, so greedy decoding never picks them: every
request generates exactly max_tokens on both servers (checked: `equal_work`), and the texts decode.

Measured per server and concurrency: completion tokens/s and requests/s (over the wall time from
the first request sent to the last answered), request latency p50/p95 (send to last byte) and,
for streaming requests, time to first token p50/p95 (send to the first chunk carrying text).

transformers serve runs with `--continuous-batching` (paged attention; it runs on the CPU), its KV
cache sized by `--cb-num-blocks` (by default it takes 90% of the machine's free RAM); `--transformers-mode
sequential` measures its default mode instead (one `generate` per request, one at a time).

A second part shows what transformers serve cannot do: lorakit serves `--adapters` LoRA adapters
(r=16, all linear layers) loaded by name beside the base, and the same workload runs with each
request's `model` field naming the base or one of the adapters in turn, so rows of one batch use
different adapters. The pinned transformers server answers a request naming an adapter with an
error (recorded in `adapters.transformers_probe`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_workload import SIZES, make_rows, pseudo_words  # noqa: E402

SERVERS = ("lorakit", "transformers")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
API_KEY = "bench"  # lorakit: enables /admin/stats (batch sizes); transformers serve ignores the header
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Profile:
    """Model size and workload shape."""

    size: str  # a key of sft_workload.SIZES
    short_tokens: tuple[int, int]  # prompt length range of short prompts
    long_tokens: tuple[int, int]  # ... and of long ones
    max_tokens: tuple[int, int]  # completion length range
    context: int  # max_position_embeddings of the built model


PROFILES = {
    "smollm": Profile("smollm", (8, 40), (200, 400), (16, 128), 8192),
    "quick": Profile("tiny", (4, 12), (40, 80), (4, 12), 512),
}


@dataclass
class Request:
    index: int
    chat: bool
    text: str  # the prompt, or the user message
    max_tokens: int
    stream: bool
    long: bool

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": 0.0,
                                "stream": self.stream}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.text}]
        else:
            body["prompt"] = self.text
        if self.stream:
            body["stream_options"] = {"include_usage": True}  # transformers serve always sends usage, and ignores it
        return body


@dataclass
class Outcome:
    """One request as a client saw it."""

    index: int
    model: str
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None  # streaming only: to the first chunk with text
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    error: str | None = None


# ----------------------------------------------------------------------------- model and workload


def build_folder(profile: Profile, dtype: str, seed: int, folder: Path) -> dict[str, Any]:
    """A Llama of the profile's size with random weights and a byte BPE tokenizer, saved as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.data import train_byte_bpe

    size = SIZES[profile.size]
    texts = [f"{r['prompt']}\n{r['completion']}" for r in make_rows(2000, size, seed + 1)]
    tokenizer = train_byte_bpe(texts, vocab_size=size.vocab, extra_special_tokens=CHAT_TOKENS, chat_template=CHATML)
    config = LlamaConfig(
        vocab_size=size.model_vocab or size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads or size.heads,
        max_position_embeddings=profile.context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # never chosen by greedy decoding (the largest logit is positive): ids past the tokenizer's vocabulary, special
    # tokens (so every request runs to its max_tokens) and byte tokens that are not whole UTF-8 characters (so every
    # token streams as text at once)
    never = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])] + tokenizer.all_special_ids
    with torch.no_grad():
        output = model.get_output_embeddings().weight
        output[len(tokenizer):] = 0
        output[never] = 0
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"size": profile.size, **asdict(size), "context": profile.context, "tokenizer_vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype}


def make_adapters(folder: Path, count: int, seed: int, out: Path) -> dict[str, Path]:
    """`count` LoRA adapters (r=16, all linear layers) on the model in `folder`, with random B so each changes it."""
    import torch

    import lorakit
    from lorakit.models import load_model

    paths = {}
    for index in range(count):
        torch.manual_seed(seed + index)
        lora = lorakit.LoRA(r=16, alpha=32, targets="all-linear")
        model = lorakit.apply(load_model(str(folder), dtype="float32"), lora)
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        paths[f"a{index}"] = lorakit.save_adapter(model, out / f"a{index}", base_model_name_or_path=str(folder))
    return paths


def make_workload(count: int, profile: Profile, tokenizer, seed: int) -> list[Request]:
    """`count` requests, deterministic from `seed`: half short and half long prompts (shuffled), chat about
    two thirds of them, streaming about half, max_tokens uniform in the profile's range."""
    rng = random.Random(f"serve-bench:{seed}")
    words = pseudo_words(2000, rng)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    longs = [i % 2 == 1 for i in range(count)]
    rng.shuffle(longs)
    requests = []
    for index, long in enumerate(longs):
        low, high = profile.long_tokens if long else profile.short_tokens
        target = rng.randint(low, high)
        text: list[str] = []
        while (have := len(tokenizer(" ".join(text), add_special_tokens=False)["input_ids"])) < target:
            text += rng.choices(words, weights, k=max(1, (target - have) // 3))
        requests.append(Request(index, chat=rng.random() < 2 / 3, text=" ".join(text),
                                max_tokens=rng.randint(*profile.max_tokens), stream=rng.random() < 0.5, long=long))
    return requests


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def transformers_executable() -> list[str]:
    script = Path(sys.executable).parent / "transformers"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())"]


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    log: Path
    ready_path: str
    model_field: str  # the request `model` value for the base model
    process: subprocess.Popen | None = field(default=None, repr=False)
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_command(name: str, folder: Path, port: int, args: argparse.Namespace,
                   adapters: dict[str, Path] | None = None) -> tuple[list[str], str, str]:
    """(command, readiness path, base model field) for one server."""
    if name == "lorakit":
        command = [sys.executable, "-m", "lorakit", "serve", "--model", str(folder), "--dtype", args.dtype,
                   "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY]
        for adapter, path in (adapters or {}).items():
            command += ["--adapter", f"{adapter}={path}"]
        return command, "/v1/models", "base"
    command = [*transformers_executable(), "serve", str(folder), "--device", "cpu", "--dtype", args.dtype,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if args.transformers_mode == "cb":
        command += ["--continuous-batching", "--cb-num-blocks", str(args.cb_num_blocks)]
    return command, "/health", str(folder)


def server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def start(server: Server, threads: int, timeout_s: float) -> None:
    """Start the server and wait until it answers its readiness path."""
    import httpx

    began = time.perf_counter()
    with open(server.log, "wb") as log:
        server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, env=server_env(threads),
                                          start_new_session=True)
    deadline = began + timeout_s
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} serve exited with code {server.process.returncode} before it was ready:\n"
                             + tail(server.log))
        try:
            if httpx.get(server.url + server.ready_path, timeout=5,
                         headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200:
                server.startup_s = time.perf_counter() - began
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(server)
    raise SystemExit(f"{server.name} serve was not ready after {timeout_s:.0f} s:\n" + tail(server.log))


def stop(server: Server) -> None:
    """End the server process this benchmark started (SIGTERM, then SIGKILL)."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- clients


async def send(client, url: str, request: Request, model: str) -> Outcome:
    """One request, streaming or not, timed from send to last byte (and to the first text, when streaming)."""
    out = Outcome(request.index, model)
    path = "/v1/chat/completions" if request.chat else "/v1/completions"
    began = time.perf_counter()
    try:
        if not request.stream:
            response = await client.post(url + path, json=request.body(model))
            out.status = response.status_code
            out.latency_s = time.perf_counter() - began
            body = response.json()
            if response.status_code != 200:
                out.error = json.dumps(body)[:500]
                return out
            choice = body["choices"][0]
            out.text = choice["message"]["content"] if request.chat else choice["text"]
            out.prompt_tokens = body["usage"]["prompt_tokens"]
            out.completion_tokens = body["usage"]["completion_tokens"]
            return out
        pieces = []
        async with client.stream("POST", url + path, json=request.body(model)) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.error = (await response.aread()).decode(errors="replace")[:500]
                out.latency_s = time.perf_counter() - began
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = json.dumps(chunk["error"])[:500]
                    continue
                out.chunks += 1
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if request.chat else choice.get("text")
                    if piece:
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - began
                        pieces.append(piece)
                if chunk.get("usage"):
                    out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    out.completion_tokens = chunk["usage"]["completion_tokens"]
        out.latency_s = time.perf_counter() - began
        out.text = "".join(pieces)
    except Exception as error:  # recorded, not raised: the run's check says which requests failed
        out.error = f"{type(error).__name__}: {error}"
        out.latency_s = time.perf_counter() - began
    return out


async def run_level(url: str, requests: list[Request], models: list[str], concurrency: int
                    ) -> tuple[list[Outcome], float]:
    """Every request once, `concurrency` closed-loop clients taking them in order; (outcomes, wall seconds)."""
    import httpx

    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        async def worker() -> None:
            while not queue.empty():
                request = queue.get_nowait()
                outcomes.append(await send(client, url, request, models[request.index % len(models)]))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    return sorted(outcomes, key=lambda o: o.index), wall


def batch_stats(server: Server) -> dict[str, int] | None:
    """lorakit's batcher counters (None for transformers serve)."""
    import httpx

    if server.name != "lorakit":
        return None
    response = httpx.get(server.url + "/admin/stats", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    return response.json() if response.status_code == 200 else None


def warm_up(server: Server, requests: list[Request], models: list[str], concurrency: int) -> float:
    """Untimed: one long and one short request alone, then a burst at the highest concurrency."""
    began = time.perf_counter()
    longs = [r for r in requests if r.long][:1] + [r for r in requests if not r.long][:1]
    burst = requests[:max(2, min(concurrency, 8))]
    for chosen, clients in ((longs, 1), (burst, len(burst))):
        outcomes, _ = asyncio.run(run_level(server.url, chosen, models, clients))
        failed = [o for o in outcomes if o.error or o.status != 200]
        if failed:
            raise SystemExit(f"{server.name} failed a warm-up request: {failed[0].error}\n" + tail(server.log))
    return time.perf_counter() - began


# ----------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def figures(outcomes: list[Outcome], wall: float, requests: list[Request]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None and o.status == 200]
    tokens = sum(o.completion_tokens or 0 for o in ok)
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    wanted = {r.index: r.max_tokens for r in requests}
    return {
        "requests": len(outcomes), "ok": len(ok), "wall_s": wall, "completion_tokens": tokens,
        "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95), "streams": len(ttfts),
        "all_nonempty": len(ok) == len(outcomes) and all(o.text for o in ok),
        "all_full_length": all(o.completion_tokens == wanted[o.index] for o in ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
    }


def measure(server: Server, requests: list[Request], models: list[str], levels: list[int]) -> dict[str, Any]:
    """Warm up, then the whole request list at each concurrency; figures and the outcomes per level."""
    result: dict[str, Any] = {"command": server.command, "startup_s": server.startup_s,
                              "warmup_s": warm_up(server, requests, models, max(levels)), "levels": {}}
    for level in levels:
        before = batch_stats(server)
        print(f"  {server.name}{' (adapters)' if len(models) > 1 else ''}: {len(requests)} requests at concurrency "
              f"{level} ...", file=sys.stderr, flush=True)
        outcomes, wall = asyncio.run(run_level(server.url, requests, models, level))
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} serve died (exit code {server.process.returncode}) at concurrency "
                             f"{level}:\n" + tail(server.log))
        entry = figures(outcomes, wall, requests)
        after = batch_stats(server)
        if before and after and "steps" in after:  # rows per decoding step, and prefill groups
            steps = after["steps"] - before["steps"]
            entry["mean_batch"] = (after["row_steps"] - before["row_steps"]) / steps if steps else None
            entry["prefills"] = after["batches"] - before["batches"]
        entry["outcomes"] = [asdict(o) for o in outcomes]
        result["levels"][str(level)] = entry
    result["peak_rss_mb"] = peak_rss_mb(server)
    return result


def peak_rss_mb(server: Server) -> float | None:
    """The server process's peak resident memory so far (VmHWM), MiB."""
    try:
        for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def adapter_probe(server: Server, request: Request, adapter: str) -> dict[str, Any]:
    """What transformers serve answers to a request that names an adapter in `model`."""
    outcome = asyncio.run(run_level(server.url, [request], [adapter], 1))[0][0]
    return {"model": adapter, "status": outcome.status, "answer": outcome.error or outcome.text[:200]}


# ----------------------------------------------------------------------------- report


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": [f for f in RELEVANT_FLAGS if f in flags], "cpus": os.cpu_count()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("lorakit", "torch", "transformers", "fastapi", "uvicorn", "httpx", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def ratios(lorakit: dict[str, Any], other: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lorakit / other per level: throughput ratios (> 1: lorakit faster) and latency ratios (< 1: lorakit faster)."""
    out = {}
    for level, mine in lorakit["levels"].items():
        theirs = other["levels"].get(level)
        if theirs is None:
            continue
        out[level] = {key: (mine[key] / theirs[key] if mine[key] and theirs[key] else None)
                      for key in ("tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
                                  "ttft_p95_s")}
    return out


def agreement(results: dict[str, Any], servers: list[str]) -> dict[str, Any] | None:
    """Across servers at concurrency 1: the same prompt token counts, and how many texts agree (greedy, same
    weights; bf16 rounding in different kernels may flip near-ties, so this is information, not a check)."""
    if len(servers) < 2:
        return None
    level = min(results[servers[0]]["levels"], key=int)
    a, b = (results[s]["levels"][level]["outcomes"] for s in servers[:2])
    return {"level": int(level), "requests": len(a),
            "same_prompt_tokens": sum(x["prompt_tokens"] == y["prompt_tokens"] for x, y in zip(a, b)),
            "same_text": sum(x["text"] == y["text"] for x, y in zip(a, b))}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    rows = [f"{'server':26}{'conc':>5}{'tok/s':>9}{'req/s':>8}{'lat p50':>9}{'lat p95':>9}{'ttft p50':>10}"
            f"{'ttft p95':>10}{'batch':>7}"]
    named = [(name, result["servers"][name]) for name in result["servers"]]
    if result.get("adapters"):
        named.append((f"lorakit +{len(result['adapters']['names'])} adapters", result["adapters"]["lorakit"]))
    for name, entry in named:
        for level, f in entry["levels"].items():
            rows.append(f"{name:26}{level:>5}{f['tokens_per_s']:>9.1f}{f['requests_per_s']:>8.2f}"
                        f"{fmt(f['latency_p50_s'], '.2f'):>9}{fmt(f['latency_p95_s'], '.2f'):>9}"
                        f"{fmt(f['ttft_p50_s'], '.3f'):>10}{fmt(f['ttft_p95_s'], '.3f'):>10}"
                        f"{fmt(f.get('mean_batch'), '.1f'):>7}")
    if result["ratios"]:
        rows += ["", f"lorakit / transformers serve ({result['settings']['transformers_mode']}): throughput > 1 and "
                     "latency < 1 favour lorakit",
                 f"{'conc':>5}{'tok/s':>9}{'req/s':>8}{'lat p50':>9}{'lat p95':>9}{'ttft p50':>10}{'ttft p95':>10}"]
        for level, r in result["ratios"].items():
            rows.append(f"{level:>5}" + "".join(f"{fmt(r[k], '.2f'):>{w}}" for k, w in (
                ("tokens_per_s", 9), ("requests_per_s", 8), ("latency_p50_s", 9), ("latency_p95_s", 9),
                ("ttft_p50_s", 10), ("ttft_p95_s", 10))))
    if result.get("adapters") and result["adapters"].get("transformers_probe"):
        probe = result["adapters"]["transformers_probe"]
        rows += ["", f"transformers serve asked for model={probe['model']!r}: HTTP {probe['status']} "
                     f"{probe['answer'][:150]}"]
    memory = [f"{name} {entry['peak_rss_mb']:.0f} MiB" for name, entry in named if entry.get("peak_rss_mb")]
    if memory:
        rows += ["", "server peak RSS: " + ", ".join(memory)]
    checks = result["checks"]
    rows += ["", "checks: " + ", ".join(f"{k}={v}" for k, v in checks.items())]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and a small workload (16 requests at 1 and 4 clients): a smoke run")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per concurrency level (default 64; quick 16)")
    parser.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,8,32; quick 1,4)")
    parser.add_argument("--servers", default="lorakit,transformers", help="which servers to measure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the model's dtype, saved and passed to both servers")
    parser.add_argument("--adapters", type=int, default=4,
                        help="the second part: lorakit serving this many adapters by request `model` (0: skip)")
    parser.add_argument("--transformers-mode", choices=("cb", "sequential"), default="cb",
                        help="cb: --continuous-batching (default); sequential: its default one-at-a-time generate")
    parser.add_argument("--cb-num-blocks", type=int, default=None,
                        help="transformers' continuous-batching KV cache in 256-token blocks (default: room for "
                             "every concurrent request's longest sequence, twice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to be ready")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the model folder, adapters and server logs here and keep them")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    args.profile = PROFILES["quick" if args.quick else "smollm"]
    args.requests = args.requests or (16 if args.quick else 64)
    args.levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "1,8,32")).split(",")]
    args.server_names = [s for s in args.servers.split(",") if s]
    if not args.server_names or any(s not in SERVERS for s in args.server_names):
        parser.error(f"--servers: choose from {', '.join(SERVERS)}")
    if args.requests < 2 or min(args.levels) < 1:
        parser.error("--requests must be at least 2 and every concurrency at least 1")
    if args.cb_num_blocks is None:  # longest prompt + completion, per client, twice over, in 256-token blocks
        longest = args.profile.long_tokens[1] + args.profile.max_tokens[1] + 32
        args.cb_num_blocks = max(16, 2 * max(args.levels) * -(-longest // 256))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = " ".join(["python", "benchmarks/serve_speed.py", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        folder = work / "model"
        print(f"building the model folder {folder} ...", file=sys.stderr, flush=True)
        model_info = build_folder(args.profile, args.dtype, args.seed, folder)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        requests = make_workload(args.requests, args.profile, tokenizer, args.seed)
        with_adapters = args.adapters and "lorakit" in args.server_names
        adapters = make_adapters(folder, args.adapters, args.seed, work / "adapters") if with_adapters else {}
        results: dict[str, Any] = {}
        probe = None
        for name in args.server_names:
            port = free_port()
            cmd, ready, model_field = server_command(name, folder, port, args)
            server = Server(name, cmd, port, work / f"{name}.log", ready, model_field)
            print(f"starting {name} serve ...", file=sys.stderr, flush=True)
            start(server, args.threads, args.startup_timeout)
            try:
                results[name] = measure(server, requests, [model_field], args.levels)
                if name == "transformers" and adapters:
                    probe = adapter_probe(server, requests[0], next(iter(adapters)))
            finally:
                stop(server)
        adapter_part = None
        if adapters:
            port = free_port()
            cmd, ready, model_field = server_command("lorakit", folder, port, args, adapters)
            server = Server("lorakit", cmd, port, work / "lorakit-adapters.log", ready, model_field)
            print("starting lorakit serve with adapters ...", file=sys.stderr, flush=True)
            start(server, args.threads, args.startup_timeout)
            try:
                models = [model_field, *adapters]
                adapter_part = {"names": list(adapters), "models_in_turn": models,
                                "lorakit": measure(server, requests, models, args.levels),
                                "transformers_probe": probe}
            finally:
                stop(server)
    checks = {f"{name}_all_nonempty": all(level["all_nonempty"] for level in entry["levels"].values())
              for name, entry in results.items()}
    checks.update({f"{name}_all_ok": all(level["ok"] == level["requests"] for level in entry["levels"].values())
                   for name, entry in results.items()})
    checks["equal_work"] = all(level["all_full_length"] for entry in results.values()
                               for level in entry["levels"].values())
    if adapter_part:
        levels = adapter_part["lorakit"]["levels"].values()
        checks["adapters_all_nonempty"] = all(level["all_nonempty"] for level in levels)
    result = {
        "benchmark": "serving: lorakit serve vs transformers serve (OpenAI-compatible, same model and workload)",
        "command": command,
        "environment": {**cpu_info(), **versions()},
        "settings": {"threads": args.threads, "dtype": args.dtype, "requests": args.requests,
                     "concurrency": args.levels,
                     "seed": args.seed, "transformers_mode": args.transformers_mode,
                     "cb_num_blocks": args.cb_num_blocks if args.transformers_mode == "cb" else None,
                     "profile": asdict(args.profile), "model": model_info,
                     "workload": {"chat": sum(r.chat for r in requests), "stream": sum(r.stream for r in requests),
                                  "long_prompts": sum(r.long for r in requests),
                                  "max_tokens_total": sum(r.max_tokens for r in requests),
                                  "requests": [asdict(r) | {"text": r.text[:60]} for r in requests]}},
        "servers": results,
        "ratios": ratios(results["lorakit"], results["transformers"]) if len(results) == 2 else {},
        "agreement": agreement(results, list(results)),
        "adapters": adapter_part,
        "checks": checks,
    }
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
