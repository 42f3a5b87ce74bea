"""fp16 training with dynamic loss scaling: a falling loss on CPU, an overflowing step skipped (weights, optimizer and
schedule untouched, scale halved), growth after clean steps, the scaler through checkpoints and through the DPO and
GRPO objectives, auto's choice on a GPU without bf16, and the one spelling of dtypes."""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch
from _tol import TINY, approx
from grpo_fixtures import grpo_run, rollout, tiny_lora
from preference_fixtures import lora_llama, make_pairs, pair_batches
from train_fixtures import freeze_except, losses, make_examples, pad_batch, run_tiny, tiny_llama

from lorakit import dtypes
from lorakit.analysis.memory import _bytes
from lorakit.config import ModelConfig
from lorakit.errors import ConfigError
from lorakit.models import to_dtype
from lorakit.train import TrainConfig, auto, read_metrics, train
from lorakit.train.precision import PRECISIONS, LossScaler
from lorakit.train.step import make_loss_sum, train_step

CPU = torch.device("cpu")
INITIAL_SCALE = 2.0 ** 16  # torch.amp.GradScaler's


def adapter_like() -> torch.nn.Module:
    return freeze_except(tiny_llama(seed=0), "q_proj", "v_proj")


def overflow_at(model: torch.nn.Module, calls: set[int]) -> list[int]:
    """Make the gradient of the first trained weight inf on the backward passes numbered `calls` (1-based); returns
    the running count of passes."""
    count = [0]
    param = next(p for p in model.parameters() if p.requires_grad)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return torch.full_like(grad, float("inf")) if count[0] in calls else grad

    param.register_hook(hook)
    return count


def records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("precision", ["fp16", "fp16-autocast"])
def test_fp16_training_on_cpu_has_a_falling_loss(tmp_path, precision, one_thread):
    summary, model = run_tiny(tmp_path, precision=precision, epochs=3)
    curve = losses(tmp_path)
    assert len(curve) == summary.steps == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.2  # it learns (4.25 -> 3.6 on this run)
    frozen = model.model.embed_tokens.weight.dtype
    assert frozen == (torch.float16 if precision == "fp16" else torch.float32)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the master weights stay fp32
    last = records(tmp_path)[-1]
    assert (last["loss_scale"], last["skipped_steps"]) == (INITIAL_SCALE, 0)


def _one_step(model, batch, optimizer, scaler, lr=1e-2):
    model_loss = make_loss_sum(model, CPU, PRECISIONS["fp16"])
    params = [p for p in model.parameters() if p.requires_grad]
    return train_step(model_loss, [batch], optimizer, params=params, lr=lr, max_grad_norm=1.0, scaler=scaler)


def test_an_inf_gradient_skips_the_step_and_halves_the_scale(one_thread):
    model = adapter_like()
    PRECISIONS["fp16"].prepare(model)
    batch = pad_batch(make_examples(4, seed=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = LossScaler()
    assert not _one_step(model, batch, optimizer, scaler).skipped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: v.clone() for k, v in optimizer.state[model.model.layers[0].self_attn.v_proj.weight].items()}
    overflow_at(model, {1})
    done = _one_step(model, batch, optimizer, scaler)
    assert done.skipped and done.grad_norm is None
    assert (scaler.scale, scaler.skipped, scaler.clean_steps) == (INITIAL_SCALE / 2, 1, 0)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # no weight moved, the finite ones included
        assert param.grad is None  # and the overflowed gradients are dropped
    after = optimizer.state[model.model.layers[0].self_attn.v_proj.weight]
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # AdamW's moments and step count untouched
    assert not _one_step(model, batch, optimizer, scaler).skipped  # the next step trains again
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_scale_grows_after_growth_interval_clean_steps(one_thread):
    model = adapter_like()
    batch = pad_batch(make_examples(4, seed=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = LossScaler(scale=8.0, growth_interval=3)
    scales = []
    for _ in range(7):
        _one_step(model, batch, optimizer, scaler)
        scales.append(scaler.scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    overflow_at(model, {1})
    _one_step(model, batch, optimizer, scaler)
    assert (scaler.scale, scaler.clean_steps) == (16.0, 0)  # an overflow also restarts the count


def test_unscaling_divides_every_gradient_by_the_scale_and_finds_any_inf_or_nan():
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3,), (2, 2), (1,))]
    params[0].grad, params[1].grad = torch.tensor([3.0, -1.5, 0.0]) * 64, torch.full((2, 2), 0.25) * 64
    assert LossScaler(scale=64.0).unscale(params)  # the third has no gradient: skipped, not an error
    assert params[0].grad.tolist() == [3.0, -1.5, 0.0] and params[1].grad.tolist() == [[0.25, 0.25]] * 2
    for bad in (float("inf"), float("-inf"), float("nan")):
        params[1].grad = torch.tensor([[1.0, bad], [0.0, 0.0]])
        assert not LossScaler(scale=64.0).unscale(params)
    summed = []
    assert not LossScaler().unscale(params, total=lambda found: summed.append(found.clone()) or found)
    assert summed[0].item() > 0  # the count other ranks add their own to


def test_a_skipped_step_holds_the_schedule_back_and_is_logged(tmp_path, one_thread):
    settings = dict(precision="fp16", epochs=2, schedule="cosine", warmup_steps=2)
    run_tiny(tmp_path / "clean", **settings)
    model = adapter_like()
    overflow_at(model, {3})  # the third step's backward pass (one micro-batch a step)
    run_tiny(tmp_path / "overflow", model=model, **settings)
    clean, overflow = records(tmp_path / "clean"), records(tmp_path / "overflow")
    assert [r["skipped_steps"] for r in overflow] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [r["loss_scale"] for r in overflow] == [INITIAL_SCALE] * 2 + [INITIAL_SCALE / 2] * 6
    assert [r["grad_norm"] is None for r in overflow] == [False, False, True, False, False, False, False, False]
    lrs = [r["lr"] for r in clean]
    assert [r["lr"] for r in overflow] == lrs[:3] + lrs[2:-1]  # step 4 gets the lr step 3 had: not advanced


def test_a_resumed_fp16_run_keeps_its_scaler_and_replays_exactly(tmp_path, one_thread):
    settings = dict(precision="fp16", epochs=2, schedule="cosine", warmup_steps=2, save_every=2, keep_checkpoints=0)
    model = adapter_like()
    overflow_at(model, {2})
    _, reference = run_tiny(tmp_path / "a", model=model, **settings)

    class Interrupt(Exception):
        pass

    def stop_at_step_6(folder: Path) -> None:
        if folder.name == "step-6":
            raise Interrupt

    model = adapter_like()
    overflow_at(model, {2})
    with pytest.raises(Interrupt):
        run_tiny(tmp_path / "b", model=model, on_checkpoint=stop_at_step_6, **settings)
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step-4" / "state.json").read_text())["scaler"]
    assert (saved["scale"], saved["skipped"], saved["clean_steps"]) == (INITIAL_SCALE / 2, 1, 2)
    _, resumed = run_tiny(tmp_path / "b", model=adapter_like(), resume=tmp_path / "b" / "checkpoints" / "step-4",
                          **settings)  # no overflow hook: the skipped step is in the checkpoint
    timing = {"elapsed", "tokens_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / "a")] == \
           [{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / "b")]
    for (name, x), (_, y) in zip(reference.named_parameters(), resumed.named_parameters()):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------- the objectives share the scaler


def test_dpo_steps_go_through_the_loss_scaler(tmp_path, one_thread):
    model = lora_llama()
    overflow_at(model, {2})
    pairs = make_pairs(12, seed=3)
    cfg = TrainConfig(objective="dpo", precision="fp16", lr=5e-3, epochs=2, micro_batch_size=3, schedule="constant",
                      progress="none", save_every_minutes=0)
    train(model, cfg, run_dir=tmp_path, train_batches=lambda epoch: pair_batches(pairs, 3, epoch))
    logged = records(tmp_path)
    assert [r["skipped_steps"] for r in logged] == [0] + [1] * 7
    assert logged[-1]["loss_scale"] == INITIAL_SCALE / 2
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_grpo_steps_go_through_the_loss_scaler(tmp_path, one_thread):
    model = tiny_lora()
    overflow_at(model, {1})
    grpo_run(tmp_path, model, rollout(), precision="fp16-autocast", micro_batch_size=2, max_steps=2)
    logged = records(tmp_path)
    assert [(r["skipped_steps"], r["loss_scale"]) for r in logged] == [(1, INITIAL_SCALE / 2)] * 2


# ----------------------------------------------------------------------------- auto


@pytest.fixture
def fake_t4(monkeypatch):
    """A CUDA GPU without native bf16, as auto's probes see it (the model itself stays on the CPU)."""
    monkeypatch.delenv(auto.AUTO_ENV, raising=False)
    monkeypatch.setattr(auto, "training_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


def test_auto_picks_fp16_on_a_cuda_gpu_without_bf16(fake_t4):
    choice = auto.resolve_precision("auto", adapter_like())
    assert choice == auto.Choice("fp16", "precision: fp16 (auto: this GPU (Tesla T4) has no native bf16, so fp16 "
                                         "with dynamic loss scaling; train.precision=fp32 to keep fp32)")
    full = auto.resolve_precision("auto", tiny_llama())
    assert full.value == "fp16-autocast" and "every weight trains, so weights stay fp32" in full.line
    cfg, lines = auto.resolve_train(TrainConfig(compile=False), adapter_like())
    assert cfg.precision == "fp16" and lines == [choice.line]


def test_auto_keeps_bf16_on_a_gpu_with_it_and_follows_an_fp16_4bit_base(fake_t4, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert auto.resolve_precision("auto", adapter_like()).value == "bf16"
    model = adapter_like()
    model.model.layers[0].mlp.up_proj.weight.quant_state = types.SimpleNamespace(dtype=torch.float16)  # as Params4bit
    assert auto.resolve_precision("auto", model).value == "fp16"


def test_a_qlora_base_computing_in_fp16_trains_in_fp16(monkeypatch, one_thread):
    pytest.importorskip("bitsandbytes")
    from lorakit.adapters import QLoRA, apply

    monkeypatch.delenv(auto.AUTO_ENV, raising=False)
    model = apply(tiny_llama(seed=0), QLoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], compute_dtype="float16"))
    assert auto.resolve_precision("auto", model).value == "fp16"  # the method decides, whatever the device
    PRECISIONS["fp16"].prepare(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, scaler = pad_batch(make_examples(4, seed=1)), LossScaler()
    first = _one_step(model, batch, optimizer, scaler).loss_sum.item()
    for _ in range(4):
        last = _one_step(model, batch, optimizer, scaler).loss_sum.item()
    assert scaler.skipped == 0 and last < first


# ----------------------------------------------------------------------------- one spelling


def test_every_dtype_option_takes_one_spelling_and_its_aliases():
    assert [TrainConfig(precision=p).precision for p in ("float16", "HALF", "bfloat16-autocast", "f16-autocast",
                                                         "float32", "auto")] == \
           ["fp16", "fp16", "bf16-autocast", "fp16-autocast", "fp32", "auto"]
    assert [ModelConfig(dtype=d).dtype for d in ("bfloat16", "half", "f32", None)] == ["bf16", "fp16", "fp32", None]
    assert [to_dtype(d) for d in ("fp16", "float16", "bf16", "bfloat16", "fp32", "float32")] == \
           [torch.float16, torch.float16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert [_bytes(d) for d in ("half", "bfloat16", "float32")] == [2, 2, 4]
    assert [dtypes.from_torch(t) for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == \
           ["fp16", "bf16", "fp32", None]


def test_an_unknown_dtype_is_one_error_listing_the_accepted_spellings():
    message = ("--dtype: unknown dtype 'fp8'; use fp32, bf16 or fp16 (also accepted: float32, f32, bfloat16, float16, "
               "half, f16)")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        dtypes.canonical("fp8", "--dtype")
    with pytest.raises(ConfigError, match=r"^unknown dtype 'int3'; use fp32, bf16 or fp16 \(also accepted"):
        to_dtype("int3")
    with pytest.raises(ConfigError, match=r"^train.precision: must be one of auto, fp32, bf16-autocast, bf16, "
                                          r"fp16-autocast, fp16 \(got 'fp8'\)$"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match=r"^model.dtype: must be one of fp32, bf16, fp16 \(got 'int8'\)$"):
        ModelConfig(dtype="int8")


def test_loss_sums_agree_between_fp16_and_fp32_to_fp16_rounding(one_thread):
    batch = pad_batch(make_examples(4, seed=1))
    model = adapter_like()
    exact = make_loss_sum(model, CPU, PRECISIONS["fp32"])(batch).item()
    half = make_loss_sum(model, CPU, PRECISIONS["fp16-autocast"])(batch).item()
    assert half == approx(exact, dtype=torch.float16, reduction=TINY, scale=abs(exact))
