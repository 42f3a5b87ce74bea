"""What the `auto` settings resolve to: train.precision, data.packing and train.compile.

Each rule turns a fast path on only where it holds for the hardware and the model in hand, and
each choice comes with the one line the run prints at its start: the value, why, and the setting
that overrides it. Explicit values (fp32, true, false, ...) are used as given, without a line.

    precision  bf16 (frozen base weights in bf16, trainable weights fp32, bf16 matmuls) on a device
               that runs bf16 natively: a CUDA GPU with native bf16, an x86-64 CPU with AVX512-BF16
               or AMX-BF16 (AVX-512 alone converts bf16 but multiplies it no faster than fp32).
               bf16-autocast there when every parameter trains (nothing is frozen to store in bf16).
               fp16 (fp16-autocast when every parameter trains), with dynamic loss scaling, on a CUDA GPU
               without native bf16 (T4, V100: their tensor cores run fp16).
               A 4-bit (QLoRA) base: its compute dtype (method.compute_dtype) decides. Else fp32
               (mps and other devices too: bf16 training is not verified on them).
    packing    on when the leak probe (data/packing.py `packing_problem`) shows the model exact on
               packed rows at the run's max_length (the model as adapted: prompt tuning's hook
               refuses packed rows, so the probe refuses it); off, saying why, otherwise. On means
               each micro-batch keeps the examples it has unpacked and lays them out as packed rows
               (`data.batching.pack_each_batch`): the run's steps stay the unpacked run's, without the padding.
    compile    on when the run is long enough to pay back the compile time (`compile_break_even`: fewer tokens
               for a wider, deeper model, whose every token saves more) on a CPU with a C++ compiler or a
               CUDA GPU with Triton; off otherwise.

`LORAKIT_AUTO=off` in the environment gives every auto setting its conservative value (fp32,
unpacked, not compiled): the test suite sets it, so its numbers do not depend on the machine, and
it bisects a difference between two machines down to the auto settings.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import dtypes
from lorakit.data.packing import packing_problem
from lorakit.errors import ConfigError
from lorakit.train.config import AUTO, TrainConfig

AUTO_ENV = "LORAKIT_AUTO"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix arithmetic
# Compiling pays for itself once the run's tokens save more time than the compile takes. What compiling saves is
# mostly elementwise work (norms, rotary, activations, casts fused into fewer kernels), which grows with the width
# of every layer's activations: the rule counts it as layers x (hidden + intermediate) "units" a token.
# Measured on the embedded model (4 x (128 + 512) = 2,560 units; quickstart recipe: LoRA r16 all-linear, bf16,
# packed rows of 64 tokens, about 940 positions a step) on this project's CPU (2-vCPU Xeon with AVX512-BF16, one
# thread, shared and noisy), cold inductor cache: compiling the training graph took 69 s and 75 s (two runs), the
# evaluation graph 17 s more at the first validation. Four alternating 60-step runs, median step eager vs
# compiled: 0.134/0.114, 0.114/0.102, 0.180/0.168, 0.192/0.104 s; typically 1.6e-5 s a token saved, 6.25e-9 s a
# unit. On the benchmarks' SmolLM2-135M shape (30 x (576 + 1536) = 63,360 units) that predicts 4.0e-4 s a token;
# benchmarks/train_speed.py measured 6.6e-4 (lorakit-chunked vs lorakit, one thread, benchmarks/RESULTS.md), so
# the rule errs towards off. Break-even: COMPILE_SECONDS / (saved a token); the embedded model's is 5.6 million.
COMPILE_SECONDS = 90.0  # training graph (~72 s) and evaluation graph (~17 s)
SAVED_SECONDS_PER_UNIT = 6.25e-9  # a token, a unit of layers x (hidden + intermediate)
COMPILE_BREAK_EVEN_TOKENS = 6_000_000  # a model whose layer shape is not in its config: the embedded model's, rounded up


@dataclass(frozen=True)
class Choice:
    """What an auto setting resolved to, and the line that says so."""

    value: Any
    line: str


def auto_enabled() -> bool:
    """False when LORAKIT_AUTO=off (every auto setting then takes its conservative value)."""
    raw = os.environ.get(AUTO_ENV, "").strip().lower()
    if raw in ("", "on"):
        return True
    if raw == "off":
        return False
    raise ConfigError(f"{AUTO_ENV}={os.environ[AUTO_ENV]!r}: must be 'on' or 'off' (off: every auto setting "
                      "takes its conservative value: fp32, unpacked, not compiled)")


def _switched_off(name: str, value: Any, shown: str, override: str) -> Choice:
    return Choice(value, f"{name}: {shown} (auto: {AUTO_ENV}=off; {override})")


# ----------------------------------------------------------------------------- precision


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where the file is missing or has none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` runs bf16 matmuls natively, why, in words)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"this GPU ({name}) runs bf16 natively"
        return False, f"this GPU ({name}) has no native bf16"
    if device.type == "cpu":
        found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
        if found:
            return True, f"this CPU runs bf16 natively ({', '.join(found)})"
        return False, "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"
    return False, f"bf16 training is not verified on {device.type}"


def four_bit_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a 4-bit (bitsandbytes Params4bit) base weight is dequantised to, or None without one."""
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None and isinstance(getattr(state, "dtype", None), torch.dtype):
            return state.dtype
    return None


def training_device(model: nn.Module) -> torch.device:
    """The device `model` trains on: that of its first parameter (cpu for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def resolve_precision(setting: str, model: nn.Module, kept: str | None = None) -> Choice:
    """train.precision for `model` on its device (the rule: the module docstring); `kept`: the precision a
    resumed run started with (a run keeps its numerics when it resumes, wherever auto would now land)."""
    if setting != AUTO:
        return Choice(setting, "")
    if kept:
        return Choice(kept, f"precision: {kept} (auto: kept from the start of the run this one resumes)")
    if not auto_enabled():
        return _switched_off("precision", "fp32", "fp32", "train.precision=bf16 for bf16")
    four_bit = four_bit_compute_dtype(model)
    if four_bit is not None:
        mode = dtypes.from_torch(four_bit) or "fp32"  # the precision modes are named after their dtype
        other = "fp32" if mode != "fp32" else "bf16"
        return Choice(mode, f"precision: {mode} (auto: the 4-bit base computes in {mode}, its method.compute_dtype; "
                            f"train.precision={other} to override)")
    device = training_device(model)
    native, why = native_bf16(device)
    every = all(p.requires_grad for p in model.parameters())
    if not native and device.type == "cuda":
        mode = "fp16-autocast" if every else "fp16"
        note = "; every weight trains, so weights stay fp32 and matmuls run in fp16" if every else ""
        return Choice(mode, f"precision: {mode} (auto: {why}, so fp16 with dynamic loss scaling{note}; "
                            "train.precision=fp32 to keep fp32)")
    if not native:
        return Choice("fp32", f"precision: fp32 (auto: {why}; train.precision=bf16 to use bf16 anyway)")
    if every:
        return Choice("bf16-autocast", f"precision: bf16-autocast (auto: {why}; every weight trains, so weights "
                                       "stay fp32 and matmuls run in bf16; train.precision=fp32 to keep fp32)")
    return Choice("bf16", f"precision: bf16 (auto: {why}; train.precision=fp32 to keep fp32)")


# ----------------------------------------------------------------------------- packing


def resolve_packing(setting: bool | str, model: nn.Module, max_length: int, effect: str = "") -> Choice:
    """data.packing for `model` at `max_length`; `effect`: what packing does to the run, in words, for the line.

    The probe runs the model as adapted, so a method that refuses packed rows (prompt tuning's hook raises
    on a 4-D mask) is refused by it. An explicit true is checked by the caller with `check_packing` (an
    error, not a note, when it fails).
    """
    if setting != AUTO:
        return Choice(bool(setting), "")
    if not auto_enabled():
        return _switched_off("packing", False, "off", "data.packing=true to pack")
    found = packing_problem(model, max_length)
    if found is not None:
        return Choice(False, f"packing: off (auto: {found.reason})")
    effect = f"; {effect}" if effect else ""
    return Choice(True, f"packing: on (auto: the leak probe shows this model exact on packed rows of "
                        f"{max_length} tokens{effect}; data.packing=false to turn it off)")


# ----------------------------------------------------------------------------- compile


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot build kernels for `device` here, or None when it can."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        return None if shutil.which(compiler) or shutil.which("clang++") else f"no C++ compiler ({compiler}) found"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    return f"compiling is not verified on {device.type}"


def layer_units(model: nn.Module) -> int | None:
    """layers x (hidden + intermediate) from the model's config (Llama-style or GPT-2-style names), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (isinstance(layers, int) and isinstance(hidden, int)):
        return None
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return layers * (hidden + int(inner))


def compile_break_even(model: nn.Module) -> int:
    """Tokens a run must train for compiling to pay back its time on `model` (rule and figures: above)."""
    units = layer_units(model)
    if not units:
        return COMPILE_BREAK_EVEN_TOKENS
    tokens = COMPILE_SECONDS / (SAVED_SECONDS_PER_UNIT * units)
    step = 10 ** max(0, len(str(int(tokens))) - 2)  # rounded up to two significant digits
    return int(-(-tokens // step) * step)


def resolve_compile(setting: bool | str, device: torch.device, steps: int | None, tokens_per_step: float | None,
                    break_even: int | None = None) -> Choice:
    """train.compile for a run of `steps` optimizer steps of `tokens_per_step` positions (None: not known);
    `break_even`: the tokens that pay back compiling for the model (`compile_break_even`; None: the default)."""
    if setting != AUTO:
        return Choice(bool(setting), "")
    if not auto_enabled():
        return _switched_off("compile", False, "off", "train.compile=true to compile")
    missing = compiler_missing(device)
    if missing:
        return Choice(False, f"compile: off (auto: {missing})")
    if steps is None or tokens_per_step is None:
        return Choice(False, "compile: off (auto: the run's length is not known here; train.compile=true to force it)")
    needed = COMPILE_BREAK_EVEN_TOKENS if break_even is None else break_even
    tokens = int(steps * tokens_per_step)
    if tokens < needed:
        return Choice(False, f"compile: off (auto: a {steps}-step run of {tokens:,} tokens does not pay back "
                             f"compiling, about {needed:,} do for this model; train.compile=true to force it)")
    return Choice(True, f"compile: on (auto: a {steps}-step run of {tokens:,} tokens pays back compiling, about "
                        f"{needed:,} do for this model; train.compile=false to skip it)")


# ----------------------------------------------------------------------------- the training settings together


def resolve_train(cfg: TrainConfig, model: nn.Module, steps: int | None = None, tokens_per_step: float | None = None,
                  kept_precision: str | None = None) -> tuple[TrainConfig, list[str]]:
    """(`cfg` with precision and compile resolved, the lines to print); `steps`, `tokens_per_step`: the run's
    plan (unknown: compile auto stays off); `kept_precision`: see `resolve_precision`."""
    if cfg.precision != AUTO and cfg.compile != AUTO:
        return cfg, []
    device = training_device(model)
    precision = resolve_precision(cfg.precision, model, kept_precision)
    compiled = resolve_compile(cfg.compile, device, steps, tokens_per_step, compile_break_even(model))
    return (dataclasses.replace(cfg, precision=precision.value, compile=compiled.value),
            [choice.line for choice in (precision, compiled) if choice.line])
