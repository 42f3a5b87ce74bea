"""Preference objectives (train/preference.py) through the one loop: the math by hand, the reference model with
no second copy on every method, pair-normalised accumulation, training, resume, two ranks and the errors."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from _tol import TINY, approx, tol
from conftest import tiny_batch, tiny_gpt2, tiny_llama
from preference_fixtures import FINAL, ddp_scenario, lora_llama, make_pairs, pair_batch, pair_batches
from test_adapters_layer import perturb_
from test_data_preference import MaskIgnoring
from test_train_step import GradientRecorder
from train_fixtures import TEST_THREADS, make_examples, pad_batch
from _method_runs import WORDS, make_workdir
from lorakit.adapters import (Bottleneck, DoRA, Full, LoRA, MoLE, PromptTuning, adapters_disabled, apply,
                              apply_from_folder, merge, save_adapter, unload)
from lorakit.analysis.memory import TrainingSetup, reference_bytes
from lorakit.analysis.params import method_count
from lorakit.cli import main
from lorakit.config import build_config, read_yaml
from lorakit.data.preference import make_pair_batches
from lorakit.data.shared_prompt import make_shared_prompt_batches
from lorakit.errors import AdapterError, ConfigError, DataError, LorakitError
from lorakit.run import finetune, resolve_run_packing
from lorakit.train import TrainConfig, read_metrics, train
from lorakit.train.precision import PRECISIONS
from lorakit.train.fastloss import split_head
from lorakit.train.preference import (AdaptersOff, PreferenceObjective, RowLogps, WeightCopy, log1mexp, model_logps,
                                      pair_terms, reference_kind, row_logps)
from lorakit.train.step import Halving, halving_on_oom, make_loss_sum, split_batch, train_step

CPU, FP32 = torch.device("cpu"), PRECISIONS["fp32"]


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- the math by hand

# two pairs: rows 0, 1 chosen, rows 2, 3 rejected
POLICY = RowLogps(sums=torch.tensor([-3.0, -6.0, -5.0, -4.0]), counts=torch.tensor([2, 3, 4, 1]))
REFERENCE = torch.tensor([-4.0, -5.0, -5.0, -5.0])  # log-ratios: chosen 1, -1; rejected 0, 1


def test_dpo_loss_with_label_smoothing_and_trl_metrics_by_hand():
    terms = pair_terms(TrainConfig(objective="dpo", beta=0.5, label_smoothing=0.1), POLICY, REFERENCE)
    expected = [-0.9 * logsigmoid(0.5 * d) - 0.1 * logsigmoid(-0.5 * d) for d in (1.0, -2.0)]
    assert terms.losses.tolist() == approx(expected)
    metrics = {name: value.tolist() for name, value in terms.metrics.items()}
    assert metrics == {"rewards/chosen": [0.5, -0.5], "rewards/rejected": [0.0, 0.5], "rewards/margins": [0.5, -1.0],
                       "rewards/accuracies": [1.0, 0.0], "logps/chosen": [-3.0, -6.0], "logps/rejected": [-5.0, -4.0]}
    plain = pair_terms(TrainConfig(objective="dpo", beta=0.5), POLICY, REFERENCE)
    assert plain.losses.tolist() == approx([-logsigmoid(0.5), -logsigmoid(-1.0)])


def test_ipo_loss_uses_length_averaged_log_ratios_by_hand():
    terms = pair_terms(TrainConfig(objective="ipo", beta=0.5), POLICY, REFERENCE)
    averaged = [1 / 2 - 0 / 4, -1 / 3 - 1 / 1]  # ratio / trained tokens, chosen minus rejected
    assert terms.losses.tolist() == approx([(d - 1 / (2 * 0.5)) ** 2 for d in averaged])
    assert terms.metrics["rewards/margins"].tolist() == [0.5, -1.0]  # rewards from summed ratios, as TRL logs them


def test_simpo_loss_is_reference_free_on_average_log_probs_by_hand():
    terms = pair_terms(TrainConfig(objective="simpo", beta=2.0, simpo_gamma=0.5), POLICY, None)
    means = [-3 / 2, -6 / 3, -5 / 4, -4 / 1]
    assert terms.losses.tolist() == approx([-logsigmoid(2.0 * (means[0] - means[2]) - 0.5),
                                            -logsigmoid(2.0 * (means[1] - means[3]) - 0.5)])
    assert terms.metrics["rewards/chosen"].tolist() == approx([2 * means[0], 2 * means[1]])
    assert terms.metrics["logps/rejected"].tolist() == approx([means[2], means[3]])


def test_orpo_loss_is_chosen_nll_plus_lambda_odds_ratio_by_hand():
    terms = pair_terms(TrainConfig(objective="orpo", orpo_lambda=0.25), POLICY, None)
    means = [-3 / 2, -6 / 3, -5 / 4, -4 / 1]

    def log_odds(a: float) -> float:
        return a - math.log(1 - math.exp(a))

    ratios = [log_odds(means[0]) - log_odds(means[2]), log_odds(means[1]) - log_odds(means[3])]
    assert terms.losses.tolist() == approx([-means[0] - 0.25 * logsigmoid(ratios[0]),
                                            -means[1] - 0.25 * logsigmoid(ratios[1])])
    assert terms.metrics["nll_loss"].tolist() == approx([1.5, 2.0])
    assert terms.metrics["log_odds_chosen"].tolist() == approx(ratios)


def test_log1mexp_is_exact_on_both_branches_and_its_gradient_finite():
    x = torch.tensor([-1e-6, -0.1, -math.log(2), -3.0, -40.0], dtype=torch.float64, requires_grad=True)
    value = log1mexp(x)
    assert value.tolist() == approx([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    value.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_row_log_probs_sum_each_rows_trained_tokens():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[3, -100, 5, 1], [-100, -100, 6, -100]])
    found = row_logps(logits, labels)
    log_probs = torch.log_softmax(logits.double(), -1)
    expected = [log_probs[0, 0, 3] + log_probs[0, 2, 5] + log_probs[0, 3, 1], log_probs[1, 2, 6]]
    assert found.sums.tolist() == approx([float(v) for v in expected], reduction=7)
    assert found.counts.tolist() == [3, 1]


def test_log_probs_from_the_head_at_trained_positions_only_equal_the_full_logits_path():
    model = perturb_(lora_llama())
    batch = pair_batch(make_pairs(3, seed=11))
    plain = model_logps(model, None, batch)
    fast = model_logps(model, split_head(model), batch)
    assert torch.equal(fast.counts, plain.counts)
    torch.testing.assert_close(fast.sums, plain.sums, **tol(reduction=TINY, scale=10.0))  # sums of ~10 log-probs
    with pytest.raises(AssertionError):  # the comparison can fail: a row's last token dropped moves the sum
        labels = batch["labels"].clone()
        labels[0, (labels[0] != -100).nonzero()[-1]] = -100
        torch.testing.assert_close(model_logps(model, split_head(model), {**batch, "labels": labels}).sums,
                                   plain.sums, **tol(reduction=TINY, scale=10.0))


# ----------------------------------------------------------------------------- the reference: every method

def _logits(model, ids=None):
    with torch.no_grad():
        return model(ids if ids is not None else tiny_batch()).logits


def _qlora():
    pytest.importorskip("bitsandbytes")
    from lorakit.adapters import QLoRA
    return QLoRA(r=4, alpha=8, compute_dtype="fp32")


METHODS = {
    "lora": (tiny_llama, lambda: LoRA(r=4, alpha=8)),
    "rslora": (tiny_llama, lambda: LoRA(r=4, alpha=8, rslora=True)),
    "lora-bias-saved-head": (tiny_gpt2, lambda: LoRA(r=4, alpha=8, bias="all", modules_to_save=["lm_head"])),
    "dora": (tiny_llama, lambda: DoRA(r=4, alpha=8)),
    "qlora": (tiny_llama, _qlora),
    "prompt_tuning": (tiny_llama, lambda: PromptTuning(num_virtual_tokens=3)),
    "bottleneck": (tiny_llama, lambda: Bottleneck(size=8)),
    "mole": (tiny_llama, lambda: MoLE(r=2, num_experts=2)),
}


@pytest.mark.parametrize("case", list(METHODS))
def test_adapters_disabled_gives_exactly_the_base_models_logits(case):
    build, method = METHODS[case]
    model = perturb_(apply(build(), method()))
    adapted = _logits(model)
    with adapters_disabled(model):
        disabled = _logits(model)
    assert torch.equal(_logits(model), adapted)  # switched back on after the block
    base = _logits(unload(model)) if case == "qlora" else _logits(build())  # QLoRA's base is its 4-bit model
    assert torch.equal(disabled, base)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter does something


def test_adapters_disabled_refuses_full_fine_tuning_and_a_merged_adapter():
    with pytest.raises(AdapterError, match="full fine-tuning has no adapter to switch off"):
        with adapters_disabled(apply(tiny_llama(), Full())):
            pass
    model = merge(perturb_(apply(tiny_llama(), LoRA(r=4, alpha=8))), keep_layers=True)
    with pytest.raises(AdapterError, match="the adapter is merged into the base weights"):
        with adapters_disabled(model):
            pass


@pytest.mark.parametrize("case", ["lora", "dora", "prompt_tuning", "bottleneck"])
def test_apply_from_folder_starts_from_the_saved_adapter(case, tmp_path):
    build, method = METHODS[case]
    sft = perturb_(apply(build(), method()))
    save_adapter(sft, tmp_path / "sft")
    model = apply_from_folder(build(), method(), tmp_path / "sft")
    assert torch.equal(_logits(model), _logits(sft))
    assert all(p.requires_grad for n, p in model.named_parameters() if n in dict(sft.named_parameters())
               and dict(sft.named_parameters())[n].requires_grad)


def test_apply_from_folder_names_each_setting_the_folder_differs_in(tmp_path):
    save_adapter(apply(tiny_llama(), LoRA(r=4, alpha=8)), tmp_path / "sft")
    with pytest.raises(ConfigError) as error:
        apply_from_folder(tiny_llama(), LoRA(r=8, alpha=8, rslora=True), tmp_path / "sft")
    message = str(error.value)
    assert message.startswith(f"model.init_adapter: the method section must describe the adapter in {tmp_path / 'sft'}")
    assert "method.r is 8 in the method section but 4 there" in message
    assert "method.rslora is True in the method section but False there" in message
    with pytest.raises(ConfigError, match="full fine-tuning starts from a whole model"):
        apply_from_folder(tiny_llama(), Full(), tmp_path / "sft")


# ----------------------------------------------------------------------------- one step: pairs, not rows

def _step_grads(model, micro_batches, reference):
    model.zero_grad(set_to_none=True)
    model_loss = make_loss_sum(model, CPU, FP32, objective=PreferenceObjective(TrainConfig(objective="dpo"), reference))
    recorder = GradientRecorder(model)
    params = [p for p in model.parameters() if p.requires_grad]
    done = halving_on_oom(lambda pieces: train_step(model_loss, pieces, recorder, params=params, lr=0.0),
                          micro_batches, Halving(enabled=False), lambda rows: model.zero_grad(set_to_none=True))
    return recorder.grads, done


def test_the_step_loss_is_the_mean_over_pairs_whatever_the_micro_batch_split(one_thread):
    model = perturb_(lora_llama())
    reference = AdaptersOff(model)
    pairs = make_pairs(6, seed=1)
    whole, whole_done = _step_grads(model, [pair_batch(pairs)], reference)
    assert whole_done.units.item() == 6
    for split in ([2, 2, 2], [1, 5]):
        cut = [sum(split[:i]) for i in range(len(split) + 1)]
        grads, done = _step_grads(model, [pair_batch(pairs[a:b]) for a, b in zip(cut, cut[1:])], reference)
        assert done.loss_sum.item() == approx(whole_done.loss_sum.item(), reduction=TINY)
        assert done.units.item() == 6 and done.trained_tokens.item() == whole_done.trained_tokens.item()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole[name], msg=name, **tol(reduction=TINY))


def test_a_pair_batch_splits_by_pairs_keeping_chosen_then_rejected():
    batch = pair_batch(make_pairs(5, seed=2))
    pieces = split_batch(batch, 2)
    assert [p["pairs"] for p in pieces] == [3, 2]
    for piece, chosen in zip(pieces, ([0, 1, 2], [3, 4])):
        rows = chosen + [5 + c for c in chosen]
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(piece[key], batch[key][rows])


def test_out_of_memory_halving_of_pair_batches_keeps_the_gradient(one_thread):
    model = perturb_(lora_llama())
    reference = AdaptersOff(model)
    batch = pair_batch(make_pairs(4, seed=3))
    whole, _ = _step_grads(model, [batch], reference)
    halved, _ = _step_grads(model, split_batch(batch, 4), reference)
    for name, grad in halved.items():
        torch.testing.assert_close(grad, whole[name], msg=name, **tol(reduction=TINY))


# ----------------------------------------------------------------------------- training runs

def _run(run_dir, model, pairs, resume=False, eval_pairs=None, **settings):
    cfg = TrainConfig(**{**dict(objective="dpo", beta=0.5, lr=1e-2, epochs=3, micro_batch_size=2, grad_accum=2,
                                schedule="constant", progress="none", save_every_minutes=0), **settings})
    evals = pair_batches(eval_pairs, 4) if eval_pairs else None
    return train(model, cfg, train_batches=lambda epoch: pair_batches(pairs, 2, epoch), eval_batches=evals,
                 run_dir=run_dir, resume=resume)


def _records(run_dir) -> list[dict]:
    return read_metrics(Path(run_dir) / "metrics.jsonl")


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_a_short_run_raises_the_reward_margin_on_its_training_pairs(tmp_path, objective, one_thread):
    pairs = make_pairs(8, seed=4)
    _run(tmp_path, lora_llama(), pairs, eval_pairs=pairs, objective=objective, epochs=4)
    records = _records(tmp_path)
    first, last = records[0], records[-1]
    names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"} | ({"nll_loss", "log_odds_ratio", "log_odds_chosen"} if objective == "orpo" else set())
    assert names <= set(first) and {f"eval_{n}" for n in names} <= set(last)
    if objective in ("dpo", "ipo"):  # a fresh LoRA leaves the model its own reference: no reward yet
        assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert last["loss"] < first["loss"]
    assert last["eval_rewards/margins"] > first["rewards/margins"] + 0.1
    assert last["eval_rewards/accuracies"] == 1.0


@pytest.mark.parametrize("case", ["dora", "prompt_tuning", "bottleneck", "mole", "qlora"])
def test_every_method_trains_a_preference_objective(tmp_path, case, one_thread):
    torch.manual_seed(0)
    model = apply(tiny_llama(seed=0), METHODS[case][1]())
    _run(tmp_path, model, make_pairs(4, seed=5), epochs=2)
    records = _records(tmp_path)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    if case != "prompt_tuning":  # a fresh adapter leaves its base unchanged: policy == reference at the start
        assert records[0]["loss"] == approx(math.log(2)) and records[0]["rewards/margins"] == 0.0
    else:  # the virtual tokens change the policy from the first step; the reference has none
        assert records[0]["rewards/margins"] != 0.0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_precomputed_reference_gives_the_live_references_losses(tmp_path, method, one_thread):
    pairs = make_pairs(8, seed=6)

    def model():
        return apply(tiny_llama(seed=0), Full()) if method == "full" else lora_llama()

    live = "copy" if method == "full" else "adapters_off"
    _run(tmp_path / live, model(), pairs, epochs=1, reference=live, lr=2e-2)
    _run(tmp_path / "pre", model(), pairs, epochs=1, reference="precomputed", lr=2e-2)
    ours, theirs = _records(tmp_path / live), _records(tmp_path / "pre")
    assert len(ours) == 2 and ours[1]["rewards/margins"] != 0.0
    for got, want in zip(theirs, ours):  # the same reference numbers, computed on the same batches
        assert got["loss"] == want["loss"] and got["rewards/margins"] == want["rewards/margins"]


def test_the_run_says_which_reference_it_uses(tmp_path, capsys, one_thread):
    cfg = TrainConfig(objective="dpo", epochs=1, micro_batch_size=2, progress="none", save_every_minutes=0)
    batches = pair_batches(make_pairs(2, seed=8), 2)
    train(lora_llama(), cfg, train_batches=lambda epoch: batches, run_dir=tmp_path / "a")
    train(apply(tiny_llama(seed=0), Full()), cfg, train_batches=lambda epoch: batches, run_dir=tmp_path / "b")
    out = capsys.readouterr().out
    assert ("objective dpo (beta 0.1): the loss of a step is the mean over its pairs; reference: the same model "
            "with its adapter switched off (the base model; no second copy)") in out
    assert "reference: a frozen copy of the initial trainable weights (" in out
    assert "train.chunked_loss" not in out  # Llama's head is taken at the trained positions only


STABLE = ("step", "epoch", "loss", "lr", "grad_norm", "trained_tokens", "rewards/chosen", "rewards/rejected",
          "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("method, reference", [("lora", "auto"), ("full", "copy"), ("full", "precomputed")])
def test_a_run_resumed_from_its_checkpoint_logs_bit_identical_losses(tmp_path, method, reference, one_thread):
    """The checkpoint falls inside a logging interval (save every 2 steps, log every 3): the pending loss and
    metric sums travel with it; the reference is the initial model's, not the checkpoint's."""
    pairs = make_pairs(12, seed=9)

    def model():
        return apply(tiny_llama(seed=0), Full()) if method == "full" else lora_llama()

    common = dict(epochs=2, reference=reference, save_every=2, log_every=3, keep_checkpoints=0, lr=2e-2)
    _run(tmp_path / "whole", model(), pairs, **common)
    _run(tmp_path / "resumed", model(), pairs, resume=tmp_path / "whole" / "checkpoints" / "step-2", **common)
    whole, resumed = _records(tmp_path / "whole"), _records(tmp_path / "resumed")
    assert [r["step"] for r in whole] == [3, 6] and [r["step"] for r in resumed] == [3, 6]
    for got, want in zip(resumed, whole):
        assert {k: got[k] for k in STABLE} == {k: want[k] for k in STABLE}


# ----------------------------------------------------------------------------- two ranks

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_ddp_ranks_match_one_process(tmp_path, one_thread):
    ddp_scenario(tmp_path / "one", grad_accum=4)  # 2 ranks x grad_accum 2 == 1 process x grad_accum 4
    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(_free_port()), str(Path(__file__).with_name("preference_fixtures.py")), str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one" / FINAL)), load_file(str(tmp_path / "two" / FINAL))
    for name in one:  # 4 steps at lr 1e-2
        torch.testing.assert_close(two[name], one[name], msg=name, **tol(reduction=TINY, steps=4, scale=1e-2 * 4))
    for got, want in zip(_records(tmp_path / "two"), _records(tmp_path / "one")):
        assert got["trained_tokens"] == want["trained_tokens"]  # counted over both ranks, filler pairs excluded
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            assert got[key] == approx(want[key], reduction=TINY, steps=4), key


# ----------------------------------------------------------------------------- mistakes

def test_preference_objective_and_data_must_agree(tmp_path, one_thread):
    pairs = pair_batches(make_pairs(2, seed=10), 2)
    with pytest.raises(LorakitError, match="train.objective is sft, but the batches hold preference pairs"):
        train(lora_llama(), TrainConfig(epochs=1, progress="none"), train_batches=lambda epoch: pairs,
              run_dir=tmp_path / "a")
    examples = [pad_batch(make_examples(2, seed=1))]
    with pytest.raises(LorakitError, match="train.objective dpo trains on preference pairs, but the batches are SFT"):
        train(lora_llama(), TrainConfig(objective="dpo", epochs=1, progress="none"),
              train_batches=lambda epoch: examples, run_dir=tmp_path / "b")


def test_preference_settings_are_checked_and_trl_names_are_read():
    with pytest.raises(ConfigError, match=r"^train.label_smoothing: applies to objectives dpo and simpo, not ipo "):
        TrainConfig(objective="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"^train.reference: objective orpo has no reference model"):
        TrainConfig(objective="orpo", reference="copy")
    with pytest.raises(ConfigError, match=r"^train.beta: must be > 0"):
        TrainConfig(objective="dpo", beta=0)
    cfg = build_config({"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.05, "simpo_gamma": 1.0})
    assert (cfg.train.objective, cfg.train.beta, cfg.train.label_smoothing, cfg.train.simpo_gamma) == \
        ("dpo", 0.2, 0.05, 1.0)
    assert build_config({"model": {"adapter_name_or_path": "runs/sft/adapter"}}).model.init_adapter == \
        "runs/sft/adapter"
    with pytest.raises(ConfigError, match="adapters_off needs an adapter method"):
        reference_kind(TrainConfig(objective="dpo", reference="adapters_off"), apply(tiny_llama(), Full()))


def test_weight_copy_holds_the_initial_trainable_weights_only():
    model = lora_llama()
    copy = WeightCopy(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert copy.weights.keys() == trainable.keys()
    assert copy.nbytes() == sum(p.numel() * 4 for p in trainable.values())
    assert all(torch.equal(copy.weights[n], p) and copy.weights[n] is not p for n, p in trainable.items())


def test_calc_prints_the_memory_of_each_reference_choice(capsys):
    setup = TrainingSetup(weight_dtype="bf16", trainable_dtype="fp32")
    full, lora = method_count("SmolLM2-135M", Full()), method_count("SmolLM2-135M", LoRA(r=16))
    assert reference_bytes(full, setup) == {"adapters_off": None, "copy": 2.0 * full.total, "precomputed": 0.0}
    assert reference_bytes(lora, setup) == {"adapters_off": 0.0, "copy": 4.0 * lora.trainable, "precomputed": 0.0}
    assert main(["calc", "SmolLM2-135M", "--method", "all"]) == 0
    out = capsys.readouterr().out
    assert "preference tuning (train.objective dpo or ipo): the reference model's memory, GB" in out
    assert f"\n  {'full':<14}{'n/a':>14}{full.total * 2 / 1e9:>10.2f}{0:>13.2f}" in out


# ----------------------------------------------------------------------------- `lorakit train`, SFT then DPO

PREF_ROWS = [{"prompt": f"Copy the word {w}.", "chosen": f" {w} {w}", "rejected": f" {v}"}
             for w, v in zip(WORDS, reversed(WORDS))]


def test_sft_then_dpo_through_finetune_starts_from_the_sft_adapter(tmp_path, one_thread):
    """The usual pipeline, as `lorakit train` runs it: the DPO run's adapter starts from the SFT adapter, whose
    copy is the reference, so the first step compares the policy with itself: rewards exactly 0, loss log 2."""
    root = make_workdir(tmp_path)
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PREF_ROWS))
    common = {"model": {"name_or_path": str(root / "base")}, "method": {"name": "lora", "r": 4, "alpha": 8},
              "output_dir": str(root / "runs")}
    lines: list[str] = []
    sft = finetune({**common, "name": "sft", "data": {"source": str(root / "rows.jsonl"), "val_fraction": 0.0},
                    "train": {"lr": 1e-2, "max_steps": 3, "micro_batch_size": 4, "progress": "none"}},
                   log=lines.append)
    dpo = finetune({**common, "name": "dpo", "model": {**common["model"], "init_adapter": str(sft.output)},
                    "data": {"source": str(root / "pairs.jsonl"), "val_source": str(root / "pairs.jsonl")},
                    "train": {"objective": "dpo", "beta": 0.5, "lr": 1e-2, "max_steps": 3, "micro_batch_size": 4,
                              "progress": "none"}}, log=lines.append)
    first, last = dpo.metrics[0], dpo.metrics[-1]
    assert first["rewards/margins"] == 0.0 and first["loss"] == approx(math.log(2))
    assert last["eval_rewards/margins"] > 0.1  # over all pairs after 3 steps (each step saw other pairs)
    assert (dpo.output / "adapter_config.json").is_file() and (dpo.output / "lorakit_run.json").is_file()
    report = dpo.report.read_text()
    assert "- objective: dpo, beta 0.5; losses are means per pair" in report
    assert "- data: 12 pairs from 12 rows" in report
    saved = build_config(read_yaml(dpo.run_dir / "config.yaml"))
    assert (saved.train.objective, saved.model.init_adapter) == ("dpo", str(sft.output))
    assert f"model.init_adapter: the lora adapter starts from the weights in {sft.output}" in lines
    assert "pre-flight: one training pair, trained tokens in [[...]]:" in lines
    assert any(line.startswith("objective dpo (beta 0.5): the loss of a step is the mean over its pairs; "
                               "reference: a frozen copy of the initial trainable weights") for line in lines)


def test_finetune_refuses_sft_rows_for_dpo(tmp_path):
    root = make_workdir(tmp_path)
    common = {"model": {"name_or_path": str(root / "base")}, "output_dir": str(root / "runs")}
    with pytest.raises(DataError, match="train.objective dpo, ipo, simpo or orpo trains on preference rows"):
        finetune({**common, "data": {"source": str(root / "rows.jsonl")}, "train": {"objective": "dpo"}},
                 log=lambda line: None)


# ----------------------------------------------------------------------------- the shared-prompt layout

def with_prompts(pairs: list[dict]) -> list[dict]:
    """make_pairs' pairs with their prompt length (the untrained ids both sides begin with), as the data room's."""
    return [{**pair, "prompt_length": pair["chosen"]["labels"].index(next(
        label for label in pair["chosen"]["labels"] if label != -100))} for pair in pairs]


def layouts(pairs: list[dict], per_batch: int, shared: bool, shuffle: bool = True):
    """train_batches(epoch) of `pairs` in the padded or the shared-prompt layout: the same pairs per batch."""
    make = make_shared_prompt_batches if shared else make_pair_batches
    return lambda epoch: make(pairs, per_batch, max_length=64, pad_id=0, seed=0, epoch=epoch, shuffle=shuffle)


def lora_gpt2():
    model = tiny_gpt2(seed=0)
    torch.manual_seed(1)
    return apply(model, LoRA(r=4, alpha=8, targets="all-linear"))


def test_shared_prompt_log_probs_equal_the_padded_pairs_with_and_without_the_head_at_trained_positions():
    model = perturb_(lora_llama())
    pairs = with_prompts(make_pairs(5, seed=12))
    padded, shared = (layouts(pairs, 5, flag, shuffle=False)(0)[0] for flag in (False, True))
    assert shared["input_ids"].numel() < padded["input_ids"].numel()  # the prompt is computed once
    expected = model_logps(model, None, padded)
    bound = tol(reduction=TINY, scale=expected.sums.abs().max().item())
    for head in (None, split_head(model)):
        found = model_logps(model, head, shared)
        assert torch.equal(found.counts, expected.counts)
        torch.testing.assert_close(found.sums, expected.sums, **bound)


@pytest.mark.parametrize("build", [lora_llama, lora_gpt2])
@pytest.mark.parametrize("chunked", [True, False])
def test_shared_prompt_steps_give_the_padded_layouts_losses(tmp_path, build, chunked, one_thread):
    """Six steps (2 epochs of 6 pairs, 2 pairs a step): the losses and reward metrics of the two layouts agree to
    fp32 rounding, carried through the steps, with log-probs from the full logits or the head at trained positions."""
    pairs = with_prompts(make_pairs(6, seed=13))
    cfg = TrainConfig(objective="dpo", beta=0.5, lr=1e-2, epochs=2, micro_batch_size=2, grad_accum=1,
                      schedule="constant", progress="none", save_every_minutes=0, chunked_loss=chunked)
    for name, shared in (("padded", False), ("shared", True)):
        train(build(), cfg, train_batches=layouts(pairs, 2, shared), run_dir=tmp_path / name)
    padded, shared = _records(tmp_path / "padded"), _records(tmp_path / "shared")
    assert len(shared) == 6 and padded[-1]["loss"] < padded[0]["loss"]
    for step, (got, want) in enumerate(zip(shared, padded)):
        assert got["trained_tokens"] == want["trained_tokens"]
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert got[key] == approx(want[key], reduction=TINY, steps=step, scale=abs(want[key]) + 1), key


def test_out_of_memory_halving_splits_shared_prompt_rows_by_whole_pairs(one_thread):
    model = perturb_(lora_llama())
    pairs = with_prompts(make_pairs(5, seed=14))
    batch = layouts(pairs, 5, True, shuffle=False)(0)[0]
    pieces = split_batch(batch, 2)
    assert [p["pairs"] for p in pieces] == [3, 2]
    for piece, chosen in zip(pieces, ([0, 1, 2], [3, 4])):
        for key in ("input_ids", "position_ids", "attention_mask"):  # one row per pair
            assert torch.equal(piece[key], batch[key][chosen])
        assert torch.equal(piece["labels"], batch["labels"][chosen + [5 + c for c in chosen]])
    reference = AdaptersOff(model, fast=True)
    whole, _ = _step_grads(model, [batch], reference)
    halved, done = _step_grads(model, split_batch(batch, 4), reference)
    assert done.units.item() == 5
    for name, grad in halved.items():
        torch.testing.assert_close(grad, whole[name], msg=name, **tol(reduction=TINY))


def test_a_precomputed_reference_keys_shared_prompt_rows_whatever_batch_they_land_in(tmp_path, one_thread):
    """Epochs reshuffle the pairs, so a pair's row is padded to another width each epoch: its key must not change.
    In epoch 0 the reference runs on the very batches it was precomputed on (equal bits); later a pair's row sits
    in other company, so its log-probs round differently (fp32 rounding, carried through the steps)."""
    pairs = with_prompts(make_pairs(8, seed=15))
    common = dict(objective="dpo", beta=0.5, lr=2e-2, epochs=3, micro_batch_size=3, schedule="constant",
                  progress="none", save_every_minutes=0)
    for reference in ("adapters_off", "precomputed"):
        train(lora_llama(), TrainConfig(reference=reference, **common), train_batches=layouts(pairs, 3, True),
              run_dir=tmp_path / reference)
    live, pre = _records(tmp_path / "adapters_off"), _records(tmp_path / "precomputed")
    assert len(pre) == 9 and live[-1]["rewards/margins"] != 0.0
    for step, (got, want) in enumerate(zip(pre, live)):
        if step < 3:
            assert got["loss"] == want["loss"] and got["rewards/margins"] == want["rewards/margins"]
        for key in ("loss", "rewards/margins"):
            assert got[key] == approx(want[key], reduction=TINY, steps=step, scale=abs(want[key]) + 1), key


def _pair_config(packing) -> Any:
    return build_config({"train": {"objective": "dpo", "micro_batch_size": 4}, "data": {"packing": packing,
                                                                                       "max_length": 64}})


def test_the_run_chooses_the_pair_layout_by_the_probe_and_says_why(monkeypatch):
    pairs = with_prompts(make_pairs(8, seed=16))
    lines: list[str] = []
    monkeypatch.setenv("LORAKIT_AUTO", "on")
    assert resolve_run_packing(_pair_config("auto"), lora_llama(), pairs, lines.append) is make_shared_prompt_batches
    shared = sum(len(r) * max(r) for r in make_shared_prompt_batches(pairs, 4, max_length=64, pad_id=0,
                                                                     seed=0).row_lengths())
    padded = sum(len(r) * max(r) for r in make_pair_batches(pairs, 4, max_length=64, pad_id=0, seed=0).row_lengths())
    assert shared < padded
    assert lines == ["pair layout: shared prompt (auto: the probe shows this model's answer logits on shared-prompt "
                     "rows equal to the padded pairs'; each pair is one row, its prompt computed once: "
                     f"{shared:,} positions an epoch instead of {padded:,} padded; data.packing=false for padded "
                     "pairs)"]
    lines.clear()  # a model that ignores the tree mask: refused, padded pairs, one line saying why
    assert resolve_run_packing(_pair_config("auto"), MaskIgnoring(lora_llama()), pairs, lines.append) is \
        make_pair_batches
    assert len(lines) == 1 and lines[0].startswith(
        "pair layout: padded pairs (auto: the shared-prompt layout is not exact for model type 'llama' (attention "
        "implementation 'eager'): an answer's logits differ by ")
    with pytest.raises(DataError, match=r"^data.packing true: the shared-prompt layout is not exact for model type "
                                        r"'llama' .*; set data.packing: false$"):
        resolve_run_packing(_pair_config(True), MaskIgnoring(lora_llama()), pairs, lines.append)
    lines.clear()
    assert resolve_run_packing(_pair_config(False), lora_llama(), pairs, lines.append) is make_pair_batches
    monkeypatch.setenv("LORAKIT_AUTO", "off")
    assert resolve_run_packing(_pair_config("auto"), lora_llama(), pairs, lines.append) is make_pair_batches
    assert resolve_run_packing(_pair_config(True), lora_llama(), pairs, lines.append) is make_shared_prompt_batches
    assert lines == ["pair layout: padded pairs (auto: LORAKIT_AUTO=off; data.packing=true for the shared-prompt "
                     "layout)"]
