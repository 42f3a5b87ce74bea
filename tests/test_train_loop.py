"""End-to-end runs of `lorakit.train.train` on tiny models: what it trains, writes and preserves."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import read_metrics
from lorakit.train.precision import PRECISIONS
from lorakit.train.step import evaluate, make_loss_sum
from _tol import TINY, approx, tol
from test_train_step import OOMAbove
from train_fixtures import TinyLM, epoch_batches, freeze_except, losses, make_examples, run_tiny, tiny_llama


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora-like", "full"])
def test_loss_falls_and_only_trainable_weights_change(tmp_path, method):
    model = tiny_llama(seed=0)
    if method == "lora-like":
        freeze_except(model, "q_proj", "v_proj")
    before = _snapshot(model)
    examples = make_examples(8, seed=4, learnable=True)
    summary, _ = run_tiny(tmp_path, model=model, examples=examples, epochs=8, lr=2e-2, log_every=4)
    train_losses = losses(tmp_path)
    assert train_losses[-1] < 0.75 * train_losses[0]
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name  # frozen weights bitwise unchanged
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (summary.trainable_params, summary.total_params) == (trainable, sum(p.numel() for p in model.parameters()))
    assert summary.steps == 16 and summary.epochs == 8.0


def test_run_folder_holds_metrics_curve_and_summary(tmp_path):
    summary, _ = run_tiny(tmp_path, epochs=2, eval_examples=4, eval_every=3, log_every=2)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]  # every 2nd, every eval (3, 6), the last
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6, 8]
    assert set(records[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens",
                               "elapsed"}
    assert [r["epoch"] for r in records] == [0.5, 0.75, 1.0, 1.5, 2.0]
    assert records[-1]["trained_tokens"] == summary.trained_tokens == 2 * sum(
        int((b["labels"] != -100).sum()) for b in epoch_batches(make_examples(16, seed=2), 4, 0))
    assert all(r["elapsed"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert summary.best_eval_loss == min(r["eval_loss"] for r in records if "eval_loss" in r)
    assert summary.final_loss == records[-1]["loss"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary.to_dict()
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_accumulation_4x2_follows_the_same_trajectory_as_batches_of_8(tmp_path):
    examples = make_examples(16, seed=6, min_len=3, max_len=14)
    common = dict(examples=examples, epochs=3, lr=5e-3, weight_decay=0.1, schedule="cosine", warmup_steps=1)
    _, accumulated = run_tiny(tmp_path / "a", micro_batch_size=2, grad_accum=4, **common)
    _, big = run_tiny(tmp_path / "b", micro_batch_size=8, grad_accum=1, **common)
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "a") == approx(losses(tmp_path / "b"), reduction=TINY, steps=6)
    assert losses(tmp_path / "a", "trained_tokens") == losses(tmp_path / "b", "trained_tokens")
    for (name, a), (_, b) in zip(accumulated.named_parameters(), big.named_parameters()):
        torch.testing.assert_close(a, b, msg=name, **tol(reduction=TINY, steps=6, scale=5e-3 * 6))  # lr * steps


def test_out_of_memory_halving_keeps_the_trajectory(tmp_path, capsys):
    examples = make_examples(16, seed=6)
    base = freeze_except(tiny_llama(seed=0), "q_proj", "v_proj")
    # the plain loss path on both sides (the OOM wrapper hides the head the chunked loss would use)
    summary, _ = run_tiny(tmp_path / "oom", model=OOMAbove(base, max_rows=2), examples=examples,
                          micro_batch_size=8, epochs=2, progress="plain", chunked_loss=False)
    reference = freeze_except(tiny_llama(seed=0), "q_proj", "v_proj")
    run_tiny(tmp_path / "ref", model=reference, examples=examples, micro_batch_size=8, epochs=2, chunked_loss=False)
    assert summary.micro_batch_parts == 4 and summary.steps == 4  # same steps: same effective batch
    assert losses(tmp_path / "oom") == approx(losses(tmp_path / "ref"), reduction=TINY, steps=4)
    for (name, a), (_, b) in zip(base.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, msg=name, **tol(reduction=TINY, steps=4, scale=1e-2 * 4))  # lr * steps
    log = capsys.readouterr().err
    assert "out of memory on micro-batches of up to 8 rows: splitting each micro-batch into 2 pieces" in log
    assert "splitting each micro-batch into 4 pieces, 4 passes per step" in log


def test_seed_makes_dropout_runs_repeatable(tmp_path):
    def run(name, seed):
        model = freeze_except(tiny_llama(seed=0, dropout=0.3), "q_proj", "v_proj")
        run_tiny(tmp_path / name, model=model, epochs=1, seed=seed, base_dropout="keep")
        return losses(tmp_path / name)

    first, again, other = run("a", 1), run("b", 1), run("c", 2)
    assert first == again
    assert first != other


@pytest.mark.parametrize("precision, frozen_dtype", [("bf16-autocast", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_modes_keep_trainable_weights_fp32(tmp_path, precision, frozen_dtype):
    model = freeze_except(tiny_llama(seed=0), "q_proj", "v_proj")
    first_batch = epoch_batches(make_examples(16, seed=2), 4, epoch=0)[0]
    with torch.no_grad():
        fp32_loss = evaluate(make_loss_sum(model, torch.device("cpu"), PRECISIONS["fp32"]), [first_batch])
    if precision == "bf16":
        model.to(torch.bfloat16)  # as if loaded in bf16: the loop must lift the trainable weights to fp32
    run_tiny(tmp_path, model=model, max_steps=3, precision=precision)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else frozen_dtype), name
    bf16_losses = losses(tmp_path)
    assert bf16_losses[0] == approx(fp32_loss, torch.bfloat16)  # step 1's loss is at the initial weights
    assert bf16_losses[-1] < bf16_losses[0] and all(map(math.isfinite, bf16_losses))


def test_gradient_checkpointing_recomputes_and_matches_with_frozen_embeddings(tmp_path):
    calls = {"on": 0, "off": 0}

    def run(mode):
        model = freeze_except(tiny_llama(seed=0), "q_proj")  # embeddings frozen: the adapter case
        model.model.layers[1].self_attn.register_forward_hook(  # training forwards only (not the no-grad probes)
            lambda *args: calls.__setitem__(mode, calls[mode] + torch.is_grad_enabled()))
        run_tiny(tmp_path / mode, model=model, epochs=1, gradient_checkpointing=mode == "on")
        assert not model.is_activation_checkpointing  # switched back off after training
        return model

    with_checkpointing, without = run("on"), run("off")
    assert calls["on"] == 2 * calls["off"]  # each layer ran again in the backward pass
    assert losses(tmp_path / "on") == approx(losses(tmp_path / "off"), reduction=TINY, steps=4)
    for (name, a), (_, b) in zip(with_checkpointing.named_parameters(), without.named_parameters()):
        torch.testing.assert_close(a, b, msg=name, **tol(reduction=TINY, steps=4, scale=1e-2 * 4))  # lr * steps


def test_gradient_checkpointing_on_a_plain_module_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: TinyLM does not support"):
        run_tiny(tmp_path, model=TinyLM(), gradient_checkpointing=True)


def test_compile_runs_the_compiled_forward_and_matches_eager(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def fast_compile(model, **kwargs):  # inductor would need minutes on 2 CPU cores; dynamo still traces
        compiled.append(model)
        return real_compile(model, backend="eager", dynamic=False)

    monkeypatch.setattr(torch, "compile", fast_compile)
    model = TinyLM(seed=1)
    run_tiny(tmp_path / "compiled", model=model, epochs=1, compile=True)
    run_tiny(tmp_path / "plain", model=TinyLM(seed=1), epochs=1)
    assert compiled == [model]
    assert losses(tmp_path / "compiled") == approx(losses(tmp_path / "plain"), reduction=TINY, steps=4)


def test_max_steps_caps_the_run_and_the_schedule(tmp_path):
    summary, _ = run_tiny(tmp_path, epochs=5, max_steps=3, schedule="linear", lr=1e-2)
    assert summary.steps == 3
    assert losses(tmp_path, "lr") == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])


def test_a_model_without_trainable_parameters_is_refused(tmp_path):
    model = freeze_except(tiny_llama(seed=0))
    with pytest.raises(LorakitError, match="no trainable parameters"):
        run_tiny(tmp_path, model=model)


def test_an_empty_epoch_is_an_error(tmp_path):
    from lorakit.train import TrainConfig, train

    with pytest.raises(LorakitError, match=r"train_batches\(0\) returned no batches"):
        train(tiny_llama(), TrainConfig(progress="none"), train_batches=lambda epoch: [], eval_batches=None,
              run_dir=tmp_path)
