"""The checks `benchmarks/gpu_check.sh` runs, as small entry points that each write JSON results.

    python benchmarks/gpu_check.py check env bf16 varlen nf4 --device cuda --work DIR
    python -m torch.distributed.run --standalone --nproc-per-node 1 \
        benchmarks/gpu_check.py check ddp --device cuda --work DIR
    python benchmarks/gpu_check.py report --work DIR --out benchmarks/results/gpu-check.json

A check writes DIR/NAME.json: {"status": "pass" | "fail" | "skip", "reason": ..., figures}. Each
training check builds a small Llama with LoRA on all linear layers from a config (seeded; nothing is
downloaded) and compares the fast path with the plain one. Bounds follow tests/_tol.py's rule: two
roundings of one value differ by about SAFETY * u * sqrt(K) * (1 + S) of its size (u = eps / 2; K
the longest sum, 1 for bf16 kernels that accumulate in fp32; S optimizer steps). `report` merges
the results, the speed benchmark's JSON and the shell's step log into one file.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, requires, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SAFETY = 16  # tests/_tol.py
VOCAB, MAX_LENGTH, STEPS = 256, 128, 12
# lorakit's runtime dependencies (pyproject.toml) and what the steps add: peft (speed) and bitsandbytes (nf4)
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "datasets", "numpy", "pyyaml", "peft",
            "bitsandbytes", "accelerate")
OPTIONAL = {"bitsandbytes": "nf4", "peft": "speed", "accelerate": "speed"}  # package -> the step that needs it


class Skip(Exception):
    """The check cannot run here; the message says why."""


class Failed(Exception):
    """The check ran and its result is wrong; the message says how."""


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise Failed(message)


def bound(dtype: Any, reduction: int = 1, steps: int = 0) -> float:
    """Relative gap allowed between two roundings of one value (tests/_tol.py)."""
    import torch

    return SAFETY * torch.finfo(dtype).eps / 2 * math.sqrt(reduction) * (1 + steps)


def relative(value: Any, reference: Any) -> float:
    """|value - reference| / |reference| (norms, for tensors)."""
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- model and data


def tiny_llama(device: Any, seed: int = 0) -> Any:
    """A 2-layer Llama (GQA, head size 32) built from a config on `device`, fp32, SDPA attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                         initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device)


def lora_model(device: Any, *, active: bool = False, method: Any = None) -> Any:
    """tiny_llama with LoRA r=8 on every linear layer; `active`: B random instead of 0, so A gets gradients too."""
    import torch

    from lorakit.adapters import LoRA, apply

    # QLoRA quantises on the weights' device; new adapter weights then join the base there (as run.py does)
    model = apply(tiny_llama(device), method or LoRA(r=8, alpha=16, targets="all-linear")).to(device)
    if active:
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def copy_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """BOS, a prompt of 4-24 random tokens, then the prompt reversed and EOS (trained): learnable."""
    import random

    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 24))]
        answer = prompt[::-1] + [2]
        examples.append({"input_ids": [1, *prompt, *answer], "labels": [-100] * (1 + len(prompt)) + answer})
    return examples


def packed(examples: list[dict], rows: int, epoch: int = 0) -> list[dict]:
    """lorakit's packed micro-batches (block-diagonal mask, restarted positions) of `rows` rows."""
    from lorakit.data import make_batches

    return list(make_batches(examples, rows, pack=True, max_length=MAX_LENGTH, pad_id=0, seed=0, epoch=epoch))


def loss_and_grads(loss_of: Any, model: Any, batch: dict) -> tuple[float, Any]:
    """(mean token loss, all trainable gradients as one fp32 vector) of one micro-batch."""
    import torch

    from lorakit.train.step import count_trained_tokens

    model.zero_grad(set_to_none=True)
    loss = loss_of(batch) / count_trained_tokens([batch]).item()
    loss.backward()
    grads = [p.grad.float().flatten() for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.cat(grads)


def device_memory_mib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- checks


def check_env(device: Any) -> dict[str, Any]:
    """Versions, the GPU, unmet requirements (and the wheels that meet them), and whether lorakit imports."""
    import torch

    found: dict[str, Any] = {"python": platform.python_version(), "machine": platform.platform(),
                             "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                             "packages": {name: _installed(name) for name in PACKAGES},
                             "flash_varlen": find_spec("torch.nn.attention.varlen") is not None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                     sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                           "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "cudnn": torch.backends.cuda.cudnn_sdp_enabled()})
    unmet = unmet_requirements()
    found["unmet"] = sorted(unmet.values())
    found["wheels"] = sorted(filter(None, map(_pin, unmet)))
    try:
        for module in ("lorakit.train.loop", "lorakit.adapters.qlora", "lorakit.data.sources"):
            importlib.import_module(module)
    except Exception as error:
        raise Failed(f"lorakit does not import: {type(error).__name__}: {error}") from error
    required = [why for name, why in unmet.items() if name not in OPTIONAL]
    expect(not required, f"unmet requirements: {'; '.join(required)} (bring the wheels {', '.join(found['wheels'])})")
    expect(device.type == "cpu" or torch.cuda.is_available(), "torch sees no CUDA device")
    return found


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _pin(name: str) -> str | None:
    """name==version as constraints.txt (or benchmarks/gpu_wheels.txt) pins it."""
    for path in (ROOT / "constraints.txt", ROOT / "benchmarks" / "gpu_wheels.txt"):
        for line in path.read_text().splitlines():
            pinned = line.split("#")[0].strip()
            if pinned.lower().startswith(f"{name.lower()}=="):
                return pinned
    return None


def unmet_requirements() -> dict[str, str]:
    """{package: why} for lorakit's dependencies and the optional packages, and for their own requirements
    (one level down; not torch's: the machine's torch build is what it is)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(line) for line in [*project["dependencies"], *OPTIONAL]]
    for name in [r.name for r in wanted if r.name != "torch" and _installed(r.name)]:
        wanted += [Requirement(line) for line in requires(name) or []]
    unmet = {}
    for requirement in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        have = _installed(requirement.name)
        if have is None:
            unmet[requirement.name] = f"{requirement.name}: not installed"
        elif not requirement.specifier.contains(have.split("+")[0], prereleases=True):
            unmet[requirement.name] = f"{requirement.name}: {have} installed, {requirement} wanted"
    return unmet


def check_bf16(device: Any) -> dict[str, Any]:
    """One LoRA step in bf16 (base bf16, LoRA fp32, bf16 autocast) against fp32; then lorakit.train in bf16."""
    import torch

    from lorakit.train.precision import PRECISIONS
    from lorakit.train.step import make_loss_sum

    expect(device.type == "cpu" or torch.cuda.is_bf16_supported(), "this GPU has no bf16")
    reference = lora_model(device, active=True)
    fast = copy.deepcopy(reference)
    PRECISIONS["bf16"].prepare(fast)
    batch = packed(copy_examples(16), rows=2)[0]
    loss32, grads32 = loss_and_grads(make_loss_sum(reference, device, PRECISIONS["fp32"]), reference, batch)
    loss16, grads16 = loss_and_grads(make_loss_sum(fast, device, PRECISIONS["bf16"]), fast, batch)
    limit = bound(torch.bfloat16)
    loss_gap, grad_gap = abs(loss16 - loss32) / abs(loss32), relative(grads16, grads32)
    expect(loss_gap <= limit, f"bf16 loss {loss16:.5f} vs fp32 {loss32:.5f}: relative gap {loss_gap:.3g} > {limit:.3g}")
    expect(grad_gap <= limit, f"bf16 LoRA gradients: relative gap {grad_gap:.3g} > {limit:.3g}")
    run = train_briefly(lora_model(device), device, "bf16")
    return {"loss_fp32": loss32, "loss_bf16": loss16, "loss_gap": loss_gap, "grad_gap": grad_gap, "bound": limit, **run}


def train_briefly(model: Any, device: Any, precision: str) -> dict[str, Any]:
    """STEPS steps of lorakit.train on the copy task: the loss falls and no frozen weight moves."""
    import torch

    from lorakit.train import TrainConfig, read_metrics, train

    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    examples = copy_examples(24)
    cfg = TrainConfig(lr=1e-2, max_steps=STEPS, epochs=STEPS, micro_batch_size=2, precision=precision, compile=False,
                      warmup_steps=0, save_every_minutes=0, progress="none", seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as run_dir:
        summary = train(model, cfg, train_batches=lambda epoch: packed(examples, 2, epoch), run_dir=run_dir)
        losses = [record["loss"] for record in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in record]
    expect(len(losses) == STEPS and all(math.isfinite(x) for x in losses), f"training losses: {losses}")
    expect(losses[-1] < 0.9 * losses[0], f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")
    params = dict(model.named_parameters())
    moved = [name for name, before in frozen.items() if not torch.equal(params[name], before.to(params[name].dtype))]
    expect(not moved, f"frozen weights changed: {', '.join(moved[:3])}")
    return {"train_losses": losses, "steps_per_s": summary.steps / summary.wall_time_s,
            "tokens_per_s": summary.tokens_per_s, "peak_mib": device_memory_mib(device)}


def check_varlen(device: Any) -> dict[str, Any]:
    """Packed rows through lorakit's per-example attention (flash varlen on CUDA) against the dense block mask."""
    import torch

    from lorakit.train import varlen
    from lorakit.train.precision import PRECISIONS
    from lorakit.train.step import make_loss_sum

    cuda = device.type == "cuda"
    if cuda and find_spec("torch.nn.attention.varlen") is None:
        raise Skip(f"torch {torch.__version__} has no torch.nn.attention.varlen: lorakit keeps the dense block "
                   "mask on this GPU (the bf16 check trains that way)")
    precision = PRECISIONS["bf16" if cuda else "fp32"]  # flash needs bf16; the CPU path computes in fp32
    model = lora_model(device, active=True)
    precision.prepare(model)
    batch = packed(copy_examples(24), rows=2)[0]
    dense = loss_and_grads(make_loss_sum(model, device, precision), model, batch)
    with varlen.enabled(model, lambda: precision.autocast(device)) as applies:
        expect(applies, "lorakit's varlen probe refused the model: packed rows would use the dense mask")
        before = varlen.calls["varlen"]
        per_example = loss_and_grads(make_loss_sum(model, device, precision), model, batch)
        calls = varlen.calls["varlen"] - before
    expect(calls > 0, "the per-example attention never ran")
    limit = bound(torch.bfloat16) if cuda else bound(torch.float32, reduction=MAX_LENGTH)
    loss_gap, grad_gap = abs(per_example[0] - dense[0]) / abs(dense[0]), relative(per_example[1], dense[1])
    expect(loss_gap <= limit,
           f"varlen loss {per_example[0]:.5f} vs dense {dense[0]:.5f}: gap {loss_gap:.3g} > {limit:.3g}")
    expect(grad_gap <= limit, f"varlen gradients: relative gap {grad_gap:.3g} > {limit:.3g}")
    starts = batch["position_ids"].eq(0).sum().item()
    return {"kernel": "flash varlen (torch.nn.attention.varlen.varlen_attn)" if cuda else "per-example SDPA (CPU)",
            "precision": "bf16" if cuda else "fp32", "examples_in_batch": starts, "attention_calls": calls,
            "loss_dense": dense[0], "loss_varlen": per_example[0], "loss_gap": loss_gap, "grad_gap": grad_gap,
            "bound": limit}


def check_nf4(device: Any) -> dict[str, Any]:
    """QLoRA through bitsandbytes: 4-bit storage, the forward pass against the dequantised base, then training."""
    import torch

    if find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (bring its wheel: benchmarks/gpu_wheels.txt)")
    from bitsandbytes.nn import Params4bit

    from lorakit.adapters import QLoRA
    from lorakit.adapters.qlora import dequantize, storage_bytes

    model = lora_model(device, method=QLoRA(r=8, alpha=16, targets="all-linear", compute_dtype="bf16"))
    quantised = {name: p for name, p in model.named_parameters() if isinstance(p, Params4bit)}
    expect(len(quantised) == 14, f"{len(quantised)} 4-bit weights, expected 7 per layer")
    logical = sum(p.quant_state.shape.numel() for p in quantised.values())
    per_weight = sum(storage_bytes(p) for p in quantised.values()) / logical
    # 4 bits, an 8-bit scale per 64 weights, an fp32 scale per 256 of those, and two small code books per
    # layer: 0.517 bytes per weight on a 1024 x 1024 layer, a little more on these 128-wide ones
    expect(0.5 + 1 / 64 < per_weight < 0.6, f"{per_weight:.3f} bytes per 4-bit weight")
    reference = tiny_llama(device)
    for name, param in quantised.items():
        reference.get_parameter(name).data = dequantize(param).float()
    prompts = [example["input_ids"][:20] for example in copy_examples(64) if len(example["input_ids"]) >= 20]
    ids = torch.tensor(prompts[:4], device=device)  # (4, 20)
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits.float()
    gap, limit = relative(got, want), bound(torch.bfloat16)
    expect(gap <= limit, f"NF4 logits against the dequantised base: relative gap {gap:.3g} > {limit:.3g}")
    codes = {name: p.data.clone() for name, p in quantised.items()}
    run = train_briefly(model, device, "bf16")
    expect(all(torch.equal(p.data, codes[name]) for name, p in quantised.items()), "training changed 4-bit codes")
    return {"quantised_weights": len(quantised), "bytes_per_weight": per_weight, "logits_gap": gap, "bound": limit,
            "bitsandbytes": _installed("bitsandbytes"), **run}


def check_ddp(device: Any) -> dict[str, Any]:
    """Under torchrun: lorakit's DDP strategy (nccl on CUDA, gloo on CPU) against one process, 3 steps."""
    import os

    import torch
    import torch.distributed as dist

    from lorakit.train.distributed import DDP, Parallel
    from lorakit.train.precision import PRECISIONS
    from lorakit.train.step import make_loss_sum, train_step

    if "LOCAL_RANK" not in os.environ:
        raise Skip("not started by torchrun (gpu_check.sh starts it with --nproc-per-node 1)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        micro = packed(copy_examples(64), rows=1)[:6]
        expect(len(micro) == 6, f"{len(micro)} micro-batches, 6 wanted")
        single = lora_model(device)
        twin = copy.deepcopy(single)  # the same start for both
        weights = {}
        for parallel, model in ((Parallel(), single), (DDP(), twin)):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-2, foreach=False)
            loss_of = make_loss_sum(parallel.wrap(model, model), device, PRECISIONS["fp32"])
            for step in range(3):  # 2 micro-batches a step: no_sync on the first, all-reduce on the second
                train_step(loss_of, micro[2 * step:2 * step + 2], optimizer, params=params, lr=1e-2,
                           max_grad_norm=1.0, parallel=parallel)
            weights[parallel.kind] = torch.cat([p.detach().flatten() for p in params])
        backend, world = dist.get_backend(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
    gap = float((weights["ddp"] - weights["single"]).abs().max())
    limit = bound(torch.float32, reduction=MAX_LENGTH, steps=3) * 1e-2 * 3  # weights move by about lr per step
    expect(gap <= limit, f"DDP weights differ from one process by {gap:.3g} > {limit:.3g}")
    expect(backend == ("nccl" if device.type == "cuda" else "gloo"), f"backend {backend}")
    return {"backend": backend, "world_size": world, "max_weight_gap": gap, "bound": limit}


CHECKS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "env": check_env, "bf16": check_bf16, "varlen": check_varlen, "nf4": check_nf4, "ddp": check_ddp}


def run_checks(names: list[str], device_name: str, work: Path) -> int:
    """Run the checks in order, each writing work/NAME.json; 1 if any failed."""
    import torch

    device, failed = torch.device(device_name), False
    for name in names:
        start = time.perf_counter()
        try:
            result = {"status": "pass", **CHECKS[name](device)}
        except Skip as reason:
            result = {"status": "skip", "reason": str(reason)}
        except Exception as error:  # a failed check is recorded; the next one still runs
            reason = str(error) if isinstance(error, Failed) else f"{type(error).__name__}: {error}"
            result = {"status": "fail", "reason": reason, "traceback": traceback.format_exc().splitlines()[-12:]}
            failed = True
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name}: {result['status']}" + (f" ({result['reason']})" if "reason" in result else ""), flush=True)
        if _rank() == 0:
            (work / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return int(failed)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------- report


def read_steps(work: Path) -> list[dict[str, Any]]:
    """The shell's step log: one 'names<TAB>exit code or skip<TAB>seconds<TAB>note' line per step."""
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        names, code, seconds, note = line.split("\t")
        steps.append({"names": names.split(","), "code": code, "seconds": float(seconds), "note": note})
    return steps


def step_results(work: Path, step: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each check of one shell step: its JSON, or why there is none."""
    results = {}
    log = work / f"{step['names'][0]}.log"
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
    for name in step["names"]:
        path = work / f"{name}.json"
        if step["code"] == "skip":
            results[name] = {"status": "skip", "reason": step["note"]}
        elif name == "speed":
            results[name] = speed_result(path, step, tail)
        elif path.is_file():
            results[name] = json.loads(path.read_text())
        else:
            why = f"timed out after {step['seconds']:.0f} s" if step["code"] == "124" else f"exit code {step['code']}"
            results[name] = {"status": "fail", "reason": f"no result: the process ended ({why}) before this check "
                                                         "finished", "log_tail": tail}
    return results


def speed_result(path: Path, step: dict[str, Any], tail: list[str]) -> dict[str, Any]:
    """bench_sft.py's JSON, judged: it ran, both pipelines saw the same examples, and both losses fell."""
    if step["code"] != "0" or not path.is_file():
        return {"status": "fail", "reason": f"bench_sft.py ended with exit code {step['code']}", "log_tail": tail}
    bench = json.loads(path.read_text())
    sanity = bench.get("sanity", {})
    falls = sanity.get("loss_falls") or {"(no pipeline)": False}
    problems = ([] if sanity.get("same_examples") else ["same_examples"]) + \
        [f"loss_falls[{name}]" for name, fell in falls.items() if not fell]
    summary = {"ratios_lorakit_over_trainer": bench.get("ratios"), "sanity": sanity, "benchmark": bench}
    if problems:
        return {"status": "fail", "reason": f"sanity: {', '.join(problems)} false", **summary}
    return {"status": "pass", **summary}


def report(work: Path, out: Path, mode: str) -> int:
    """Merge every step's results into `out` (one JSON); print a table; 1 if any step failed."""
    steps = read_steps(work)
    results: dict[str, Any] = {}
    for step in steps:
        for name, result in step_results(work, step).items():
            results[name] = {**result, "step_seconds": step["seconds"]}
    plan = [line.split("\t") for line in (work / "plan.tsv").read_text().splitlines()]
    document = {"check": "lorakit GPU checks and speed benchmark (benchmarks/gpu_check.sh)", "mode": mode,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "total_seconds": sum(s["seconds"] for s in steps),
                "plan": [{"step": name, "cap_s": int(cap), "command": command} for name, cap, command in plan],
                "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1, default=str) + "\n")
    print("\n| step | status | seconds | note |\n|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['status']} | {result.get('seconds', result['step_seconds']):.1f} | "
              f"{result.get('reason') or summary_line(name, result)} |")
    print(f"\nresults: {out} ({document['total_seconds']:.0f} s)")
    return int(any(result["status"] == "fail" for result in results.values()))


def summary_line(name: str, result: dict[str, Any]) -> str:
    """The figure that matters for a passing step, for the table."""
    if name == "env":
        return f"torch {result['packages']['torch']}, {result.get('gpu', 'no GPU')}"
    if name == "speed":
        ratios = result.get("ratios_lorakit_over_trainer") or {}
        return f"lorakit/trainer tokens/s {ratios.get('tokens_per_s', float('nan')):.2f}x"
    if name == "varlen":
        return f"{result['kernel']}: loss gap {result['loss_gap']:.2g}"
    return f"gap {result.get('loss_gap', result.get('logits_gap', result.get('max_weight_gap'))):.2g} " \
           f"(bound {result['bound']:.2g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run checks, each writing WORK/NAME.json")
    check.add_argument("names", nargs="+", choices=sorted(CHECKS))
    check.add_argument("--device", choices=("cuda", "cpu"), required=True)
    check.add_argument("--work", type=Path, required=True)
    merge = sub.add_parser("report", help="merge WORK's results into one file")
    merge.add_argument("--work", type=Path, required=True)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    args = parser.parse_args(argv)
    if args.command == "check":
        return run_checks(args.names, args.device, args.work)
    return report(args.work, args.out, args.mode)


if __name__ == "__main__":
    sys.exit(main())
