"""The arithmetic of one optimizer step: loss normalisation, accumulation, splitting, halving."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import TrainConfig, field_help, lr_factor
from lorakit.train.config import PRECISION_MODES
from lorakit.train.precision import PRECISIONS
from lorakit.train.step import (Halving, count_trained_tokens, evaluate, halving_on_oom, make_loss_sum,
                                split_batch, token_loss_sum, train_step)
from _tol import TINY, approx, tol
from train_fixtures import freeze_except, make_examples, pad_batch, tiny_llama

FP32 = PRECISIONS["fp32"]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class GradientRecorder:
    """Stands in for the optimizer: `step` keeps the step's gradients instead of updating anything."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.param_groups, self.grads = model, [{}], {}

    def step(self) -> None:
        self.grads = _grads(self.model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


def _accumulated_grads(model, micro_batches, call=None, halving=None) -> tuple[dict, torch.Tensor]:
    """The gradient and summed loss of one `train_step` over `micro_batches`, wrapped in OOM halving."""
    model.zero_grad(set_to_none=True)
    model_loss = make_loss_sum(call or model, torch.device("cpu"), FP32)
    recorder = GradientRecorder(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def on_retry(max_rows: int) -> None:
        model.zero_grad(set_to_none=True)

    done = halving_on_oom(lambda pieces: train_step(model_loss, pieces, recorder, params=params, lr=0.0),
                          micro_batches, halving or Halving(enabled=False), on_retry)
    return recorder.grads, done.loss_sum


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:  # sums over the batch's tokens in another order
        torch.testing.assert_close(a[name], b[name], msg=name, **tol(reduction=TINY))


@pytest.fixture(scope="module")
def examples():
    return make_examples(8, seed=1, min_len=3, max_len=14)


def test_token_loss_sum_uses_labels_as_given_without_shifting():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, -100, 4, 5, 6]])
    expected = sum(F.cross_entropy(logits[b, t][None], labels[b, t][None])
                   for b in range(2) for t in range(5) if labels[b, t] != -100)
    torch.testing.assert_close(token_loss_sum(logits, labels), expected, **tol(reduction=8))


def test_accumulation_4x2_gives_the_gradient_of_one_batch_of_8(examples):
    model = freeze_except(tiny_llama(seed=0), "q_proj", "v_proj", "lm_head")
    full, full_sum = _accumulated_grads(model, [pad_batch(examples)])
    micro = [pad_batch(examples[i: i + 2]) for i in range(0, 8, 2)]  # each padded to its own length
    accumulated, accumulated_sum = _accumulated_grads(model, micro)
    _assert_same_grads(full, accumulated)
    torch.testing.assert_close(full_sum, accumulated_sum, **tol(reduction=TINY))

    # The test has teeth: averaging per-micro-batch means (the classic mistake) gives another gradient.
    model.zero_grad(set_to_none=True)
    for batch in micro:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        (token_loss_sum(logits, batch["labels"]) / count_trained_tokens([batch]) / len(micro)).backward()
    wrong = _grads(model)
    assert max((wrong[n] - full[n]).abs().max() for n in full) > 1e-4


def test_split_batch_cuts_every_tensor_along_rows_including_4d_masks():
    batch = {"input_ids": torch.arange(15).view(5, 3), "labels": torch.arange(15).view(5, 3),
             "attention_mask": torch.ones(5, 1, 3, 3), "note": "kept"}
    pieces = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in pieces] == [3, 2]
    assert [p["attention_mask"].shape for p in pieces] == [(3, 1, 3, 3), (2, 1, 3, 3)]
    assert all(p["note"] == "kept" for p in pieces)
    torch.testing.assert_close(torch.cat([p["labels"] for p in pieces]), batch["labels"])
    assert len(split_batch(batch, 8)) == 5  # never an empty piece


class OOMAbove(torch.nn.Module):
    """Wraps a model and raises an out-of-memory error when a batch has more than `max_rows` rows."""

    def __init__(self, model, max_rows: int, make_error=lambda: torch.OutOfMemoryError("CUDA out of memory.")):
        super().__init__()
        self.model, self.max_rows, self.make_error = model, max_rows, make_error
        self.calls: list[int] = []

    def forward(self, **inputs):
        self.calls.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > self.max_rows:
            raise self.make_error()
        return self.model(**inputs)


@pytest.mark.parametrize("make_error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory"),
])
def test_out_of_memory_splits_in_halves_and_keeps_the_gradient(examples, make_error):
    model = freeze_except(tiny_llama(seed=0), "q_proj", "lm_head")
    batch = pad_batch(examples)
    unsplit, unsplit_sum = _accumulated_grads(model, [batch])
    faulty = OOMAbove(model, max_rows=2, make_error=make_error)
    halving = Halving()
    split, split_sum = _accumulated_grads(model, [batch], call=faulty, halving=halving)
    assert halving.parts == 4  # 8 rows -> 4 -> 2
    assert faulty.calls == [8, 4, 2, 2, 2, 2]
    _assert_same_grads(unsplit, split)
    torch.testing.assert_close(unsplit_sum, split_sum, **tol(reduction=TINY))


class _RaiseInBackward(torch.autograd.Function):
    """Identity whose backward raises out-of-memory for batches of more than 2 rows."""

    @staticmethod
    def forward(ctx, hidden):
        ctx.rows = hidden.shape[0]
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        if ctx.rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory during backward")
        return grad


def test_out_of_memory_in_the_middle_of_a_backward_restarts_the_step_cleanly(examples):
    # The fault sits after layer 0, so layer 1 and lm_head already hold partial gradients when
    # it fires; the retried step must not add to them. Accumulation 2: the first micro-batch
    # (2 rows) succeeds before the second (6 rows) fails, and must not count twice either.
    model = freeze_except(tiny_llama(seed=0), "q_proj", "lm_head")
    micro = [pad_batch(examples[:2]), pad_batch(examples[2:])]
    reference, _ = _accumulated_grads(model, micro)
    handle = model.model.layers[0].register_forward_hook(lambda module, args, out: _RaiseInBackward.apply(out))
    try:
        halving = Halving()
        split, _ = _accumulated_grads(model, micro, halving=halving)
    finally:
        handle.remove()
    assert halving.parts == 4  # 6 rows -> 3 (still > 2) -> 2
    _assert_same_grads(reference, split)


def test_out_of_memory_on_a_single_row_is_a_clear_error(examples):
    model = tiny_llama(seed=0)
    faulty = OOMAbove(model, max_rows=0)
    with pytest.raises(LorakitError, match="single row"):
        _accumulated_grads(model, [pad_batch(examples[:2])], call=faulty, halving=Halving())


def test_out_of_memory_is_re_raised_when_halving_is_off(examples):
    model = tiny_llama(seed=0)
    with pytest.raises(torch.OutOfMemoryError):
        _accumulated_grads(model, [pad_batch(examples)], call=OOMAbove(model, 2), halving=Halving(enabled=False))


class _OutOfMemoryInUpdate(GradientRecorder):
    def step(self) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory in the update")


def test_out_of_memory_in_the_optimizer_update_is_raised_not_retried(examples):
    # an update stopped half way (some weights already stepped) cannot be redone: halving must not retry it
    model = freeze_except(tiny_llama(seed=0), "q_proj")
    model_loss = make_loss_sum(model, torch.device("cpu"), FP32)
    params = [p for p in model.parameters() if p.requires_grad]
    halving = Halving()
    with pytest.raises(torch.OutOfMemoryError, match="in the update"):
        halving_on_oom(lambda pieces: train_step(model_loss, pieces, _OutOfMemoryInUpdate(model), params=params,
                                                 lr=0.0), [pad_batch(examples)], halving)
    assert halving.parts == 1


def test_eval_loss_is_the_token_weighted_mean(examples):
    model = tiny_llama(seed=0)
    batches = [pad_batch(examples[:1]), pad_batch(examples[1:])]  # very different token counts
    loss = evaluate(make_loss_sum(model, torch.device("cpu"), FP32), batches)
    with torch.no_grad():
        logits = model(**{k: v for k, v in pad_batch(examples).items() if k != "labels"}).logits
    labels = pad_batch(examples)["labels"]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert loss == approx(expected.item(), reduction=TINY)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_schedules_warm_up_then_decay_without_a_zero_step(schedule, expected):
    factors = [lr_factor(step, total_steps=6, warmup_steps=2, schedule=schedule) for step in range(6)]
    assert factors == pytest.approx(expected)


@pytest.mark.parametrize("overrides, message", [
    ({"schedule": "triangle"}, "train.schedule: must be one of constant, linear, cosine (got 'triangle')"),
    ({"precision": "fp8"}, "train.precision: must be one of auto, fp32, bf16-autocast, bf16, fp16-autocast, fp16 "
                           "(got 'fp8')"),
    ({"warmup_steps": 3, "warmup_ratio": 0.1}, "train.warmup_ratio: set warmup_steps or warmup_ratio, not both"),
    ({"grad_accum": 0}, "train.grad_accum: must be >= 1 (got 0)"),
    ({"progress": "fancy"}, "train.progress: must be one of auto, bar, plain, none (got 'fancy')"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as raised:
        TrainConfig(**overrides)
    assert str(raised.value).startswith(message)


def test_the_config_names_every_precision_mode():  # train.config stays torch-free, so the names are written twice
    assert tuple(PRECISIONS) == PRECISION_MODES


def test_every_config_field_has_help_and_warmup_resolves():
    assert all(text.strip() for text in field_help().values())
    assert TrainConfig(betas=[0.8, 0.95]).betas == (0.8, 0.95)
    assert TrainConfig(warmup_ratio=0.1).resolve_warmup(50) == 5
    assert TrainConfig(warmup_steps=80).resolve_warmup(50) == 50
