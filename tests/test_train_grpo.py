"""GRPO (train/grpo.py) through the one loop: prompt rows in the run's format, the rollout (sampling seeded per
completion, completion tokens and the stop token trained), step normalisation whatever the micro-batch split, a
reward that rises, every method, the run folder's metrics, and the errors. The loss math against TRL and by hand
is tests/test_train_grpo_loss.py's and tests/test_train_grpo_trl.py's; the rewards', tests/test_train_rewards.py's;
the SIGKILL resume, tests/test_reliability.py's."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _method_runs import WORDS, make_workdir
from _tiny import CHATML, tiny_tokenizer
from _tol import TINY, approx, tol
from grpo_fixtures import FINAL, ddp_scenario, grpo_config, grpo_run, prompt_table, rollout, tiny_lora
from test_adapters_layer import perturb_
from test_train_step import GradientRecorder
from train_fixtures import TEST_THREADS
from lorakit.cli import main
from lorakit.config import load_config
from lorakit.data import DataConfig, tokenize_rows
from lorakit.data.prompting import PromptFormat
from lorakit.data.prompts import collate_prompts, make_prompt_batches, prompt_rows_format, tokenize_prompt_rows
from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.train import TrainConfig, read_metrics
from lorakit.train import grpo_loss
from lorakit.train.config import GRPO_LOSS_TYPES, REWARD_SCALES
from lorakit.train.distributed import Parallel
from lorakit.train.grpo import GRPOObjective, check_parallel, sample_seed
from lorakit.train.precision import PRECISIONS
from lorakit.train.preference import AdaptersOff
from lorakit.train.step import Halving, halving_on_oom, make_loss_sum, train_step

CPU, FP32 = torch.device("cpu"), PRECISIONS["fp32"]


# ----------------------------------------------------------------------------- prompt rows


def test_prompts_are_the_prompts_training_renders_in_each_format():
    tokenizer = tiny_tokenizer(CHATML)
    text = {"prompt": "what is two plus two?", "answer": "four"}
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "two plus two?"}],
            "answer": "four"}
    for row, format_name, sft_row in (
            (text, "prompt_completion", {"prompt": text["prompt"], "completion": " four"}),
            (chat, "chat", {"messages": [*chat["messages"], {"role": "assistant", "content": "four"}]}),
            ({"prompt": chat["messages"], "answer": "four"}, "chat",  # TRL's conversational prompt
             {"messages": [*chat["messages"], {"role": "assistant", "content": "four"}]})):
        cfg = DataConfig(prompt_template="Q: {prompt}\nA:", max_length=64)
        assert prompt_rows_format([row], cfg) == format_name
        prompt = PromptFormat.of_run(cfg, format_name, tokenizer)
        [example], stats = tokenize_prompt_rows([row], tokenizer, cfg, prompt)
        [sft], _ = tokenize_rows([sft_row], tokenizer, dataclasses.replace(cfg, format=format_name))
        untrained = sft["labels"].index(next(label for label in sft["labels"] if label != -100))
        assert example.input_ids == sft["input_ids"][:untrained]  # exactly what precedes a trained answer
        assert example.row == row and stats.n_examples == 1 and stats.n_trained_tokens == 0


def test_long_prompts_lose_their_start_but_keep_bos_or_are_dropped():
    long = {"prompt": " ".join(WORDS * 3), "answer": "x"}
    prompt = PromptFormat("prompt_completion")
    [kept], stats = tokenize_prompt_rows([long], tiny_tokenizer(), DataConfig(max_length=12), prompt)
    full = prompt.prompt_ids(tiny_tokenizer(), long["prompt"])
    assert kept.input_ids == full[:1] + full[-11:] and full[0] == tiny_tokenizer().bos_token_id
    assert stats.n_truncated == 1
    with pytest.raises(DataError, match=r"^none of the 1 rows gave a prompt \(.*dropped=1"):
        tokenize_prompt_rows([long], tiny_tokenizer(), DataConfig(max_length=12, truncation="drop"), prompt)


def test_prompt_batches_hold_padded_prompts_and_their_table_indices():
    examples = prompt_table()
    batches = make_prompt_batches(examples, 5, max_length=32, pad_id=0, seed=0, epoch=1)
    assert [len(b["prompt_index"]) for b in batches] == [5, 5, 2]
    seen = sorted(i for b in batches for i in b["prompt_index"].tolist())
    assert seen == list(range(len(examples)))
    batch = batches[0]
    for row, index in enumerate(batch["prompt_index"].tolist()):
        ids = examples[index].input_ids
        assert batch["input_ids"][row, :len(ids)].tolist() == ids and batch["attention_mask"][row].sum() == len(ids)
    assert batch["labels"].tolist() == [[0]] * 5


def test_prompt_rows_that_do_not_fit_are_one_line_each():
    tokenizer, prompt = tiny_tokenizer(), PromptFormat("chat", chat_template="builtin")
    answered = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError, match=r"^row 2: field 'messages' ends with an assistant turn; a prompt ends with "):
        tokenize_prompt_rows([{"messages": [{"role": "user", "content": "q"}]}, answered], tokenizer, DataConfig(),
                             prompt)
    with pytest.raises(DataError, match=r"^row 1: the row holds messages, but the run's prompts are text"):
        tokenize_prompt_rows([answered], tokenizer, DataConfig(), PromptFormat("prompt_completion"))
    with pytest.raises(DataError, match=r"^data.format is alpaca, but train.objective grpo samples answers to "
                                        r"prompt rows"):
        prompt_rows_format([{"instruction": "q", "output": "a"}], DataConfig(format="alpaca"))
    with pytest.raises(DataError, match=r"no row has a `prompt` \(text or messages\) or `messages` column"):
        prompt_rows_format([{"question": "q"}], DataConfig())


# ----------------------------------------------------------------------------- the rollout


def test_the_rollout_trains_each_completion_and_its_stop_token_after_its_prompt(one_thread):
    seen = []

    def length(prompts, completions, rows):
        seen.append((prompts, completions, rows))
        return [float(len(text)) for text in completions]

    stops = frozenset(range(3, 170))  # about half the vocabulary ends a completion: some stop, some are cut
    table = rollout(length, stops)
    objective = GRPOObjective(grpo_config(num_generations=4, max_completion_length=3), tiny_lora(), table, None, FP32)
    prompts = collate_prompts([table.prompts[i] for i in (0, 5, 9)], pad_id=0)
    [batch] = objective.prepare([prompts], step=3)
    [(prompt_texts, texts, rows)] = seen
    assert batch["input_ids"].shape[0] == 12 and len(texts) == 12
    outcomes = set()
    for r in range(12):
        example = table.prompts[(0, 5, 9)[r // 4]]
        n, p = int(batch["attention_mask"][r].sum()), len(example.input_ids)
        ids = batch["input_ids"][r].tolist()
        completion = ids[p:n]
        assert ids[:p] == example.input_ids and 1 <= len(completion) <= 3
        labels = batch["labels"][r].tolist()  # shifted: position t is trained on token t + 1
        assert labels == [-100] * (p - 1) + completion + [-100] * (len(ids) - p + 1 - len(completion))
        stopped = completion[-1] in stops
        assert all(token not in stops for token in completion[:-1]) and (stopped or len(completion) == 3)
        outcomes.add(stopped)
        assert texts[r] == tiny_tokenizer().decode(completion[:-1] if stopped else completion, skip_special_tokens=True)
        assert prompt_texts[r] == table.text(example.index) and rows[r] is example.row
    assert outcomes == {True, False}
    rewards = torch.tensor([float(len(text)) for text in texts])
    assert torch.equal(batch["advantages"], grpo_loss.group_advantages(rewards, 4))


def test_sampling_is_seeded_per_step_prompt_and_completion(one_thread):
    table = rollout()
    objective = GRPOObjective(grpo_config(), tiny_lora(), table, None, FP32)
    prompts = collate_prompts(list(table.prompts[:2]), pad_id=0)
    again, later = (objective.prepare([prompts], step=step)[0] for step in (7, 8))
    first = objective.prepare([prompts], step=7)[0]
    assert all(torch.equal(first[key], again[key]) for key in first)  # a resumed step samples the same
    assert not torch.equal(first["input_ids"], later["input_ids"])
    assert sample_seed(0, 7, 1, 2) == sample_seed(0, 7, 1, 2) != sample_seed(0, 7, 2, 1)
    assert len({sample_seed(s, 7, 1, 2) for s in range(100)}) == 100 and 0 <= sample_seed(5, 1, 2, 3) < 2**63


# ----------------------------------------------------------------------------- the step: units, not rows


def _step_grads(model, objective, micro_batches):
    model.zero_grad(set_to_none=True)
    model_loss = make_loss_sum(model, CPU, FP32, objective=objective)
    recorder = GradientRecorder(model)
    params = [p for p in model.parameters() if p.requires_grad]
    done = halving_on_oom(lambda pieces: train_step(model_loss, pieces, recorder, params=params, lr=0.0),
                          micro_batches, Halving(enabled=False), lambda rows: model.zero_grad(set_to_none=True))
    return recorder.grads, done


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_the_step_loss_is_the_loss_types_mean_whatever_the_micro_batch_split(loss_type, one_thread):
    model = perturb_(tiny_lora(), std=0.05)  # off the base, so the KL penalty to it has a gradient
    table = rollout(stop_ids=frozenset(range(3, 120)))
    cfg = grpo_config(grpo_loss_type=loss_type, grpo_beta=0.1, max_completion_length=5)
    objective = GRPOObjective(cfg, model, table, AdaptersOff(model), FP32)
    [batch] = objective.prepare([collate_prompts(list(table.prompts[:4]), pad_id=0)], step=0)
    whole, whole_done = _step_grads(model, objective, [batch])
    completions = batch["labels"] != -100
    expected = {"grpo": 16, "dr_grpo": 16 * 5}.get(loss_type, int(completions.sum()))
    assert whole_done.units.item() == expected and whole_done.trained_tokens.item() == completions.sum()
    for cut in ([0, 4, 16], [0, 3, 11, 16]):  # micro-batches that split groups too
        pieces = [{key: value[a:b] for key, value in batch.items()} for a, b in zip(cut, cut[1:])]
        grads, done = _step_grads(model, objective, pieces)
        assert done.units.item() == expected
        torch.testing.assert_close(done.loss_sum, whole_done.loss_sum, **tol(reduction=TINY))
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole[name], msg=name, **tol(reduction=TINY))


def test_a_fresh_adapter_is_its_own_reference_and_the_first_gradient_is_the_advantage_weighted_log_prob(one_thread):
    model = tiny_lora()
    table = rollout(stop_ids=frozenset(range(3, 120)))
    cfg = grpo_config(grpo_beta=0.5, grpo_loss_type="dapo", max_completion_length=4)
    objective = GRPOObjective(cfg, model, table, AdaptersOff(model), FP32)
    [batch] = objective.prepare([collate_prompts(list(table.prompts[:3]), pad_id=0)], step=0)
    grads, done = _step_grads(model, objective, [batch])
    sums = dict(zip(objective.sum_names, objective.take().tolist()))
    assert sums["kl"] == 0.0 and sums["tokens"] == done.units.item()  # B = 0: policy == base, bit for bit
    model.zero_grad(set_to_none=True)  # by hand: -sum_i A_i sum_t log p(o_it) / tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token = -torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    (-(token.view(batch["labels"].shape).sum(-1) * batch["advantages"]).sum() / done.units).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, msg=name, **tol(reduction=TINY))


# ----------------------------------------------------------------------------- training runs


def test_grpo_raises_the_mean_reward_the_model_can_learn(tmp_path, one_thread):
    """The reward: the share of 'e' in the completion (grpo_fixtures.e_share), sampled among the 20 likeliest tokens;
    a falling loss means nothing in RL, a rising reward does."""
    grpo_run(tmp_path, tiny_lora(), rollout(), num_generations=8, micro_batch_size=4, epochs=8, lr=3e-2, top_k=20)
    rewards = [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > 3 * first and last > first + 0.1, (first, last)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_ddp_ranks_each_sampling_their_prompts_match_one_process(tmp_path, one_thread):
    """Each rank samples its own prompt batches (the same seeds as one process would), the batch std of the rewards
    is gathered over the ranks, the last step's filler trains nothing: the weights and rewards are one process's."""
    ddp_scenario(tmp_path / "one", grad_accum=2)  # 2 ranks x grad_accum 1 == 1 process x grad_accum 2
    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(_free_port()), str(Path(__file__).with_name("grpo_fixtures.py")), str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one" / FINAL)), load_file(str(tmp_path / "two" / FINAL))
    for name in one:  # 6 steps at lr 1e-2
        torch.testing.assert_close(two[name], one[name], msg=name, **tol(reduction=TINY, steps=6, scale=1e-2 * 6))
    ours, theirs = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("two", "one"))
    assert len(ours) == len(theirs) == 6
    for got, want in zip(ours, theirs):
        assert got["trained_tokens"] == want["trained_tokens"]  # counted over both ranks, the filler excluded
        for key in ("loss", "reward", "reward_std", "completions/mean_length", "kl"):
            assert got[key] == approx(want[key], reduction=TINY, steps=6), key


# ----------------------------------------------------------------------------- the CLI: every method, the run folder


def grpo_workdir(root: Path) -> Path:
    rows = [{"prompt": f"Copy the word {w}.", "completion": f" {w} {w}", "answer": f"{w} {w}"} for w in WORDS]
    return make_workdir(root, rows, vocab_size=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return grpo_workdir(tmp_path_factory.mktemp("grpo"))


def grpo_recipe(workdir: Path, name: str, method: dict, **train_settings) -> Path:
    recipe = {"name": name, "model": {"name_or_path": str(workdir / "base")}, "method": method,
              "data": {"source": str(workdir / "rows.jsonl"), "max_length": 24, "val_fraction": 0.25},
              "train": {"objective": "grpo", "rewards": [{"name": "length_penalty", "target_length": 4,
                                                          "max_length": 30}, "contains"],
                        "num_generations": 3, "max_completion_length": 6, "micro_batch_size": 3, "lr": 1e-2,
                        "epochs": 1, "max_steps": 1, "progress": "none", "save_every_minutes": 0,
                        **train_settings}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


METHOD_SETTINGS = {
    "lora-r1": ({"name": "lora", "r": 1, "alpha": 2}, {}),
    "rslora": ({"name": "lora", "r": 4, "alpha": 8, "rslora": True}, {"grpo_beta": 0.1}),
    "dora": ({"name": "dora", "r": 4, "alpha": 8}, {"grpo_beta": 0.1}),
    "qlora": ({"name": "qlora", "r": 4, "alpha": 8, "compute_dtype": "fp32"}, {"grpo_beta": 0.1}),
    "full": ({"name": "full"}, {"grpo_beta": 0.1}),  # the reference: a frozen copy
    "prompt_tuning": ({"name": "prompt_tuning", "num_virtual_tokens": 2}, {}),
    "bottleneck": ({"name": "bottleneck", "size": 8}, {}),
    "mole": ({"name": "mole", "r": 2, "num_experts": 2}, {}),
}


@pytest.mark.parametrize("case", list(METHOD_SETTINGS))
def test_every_method_trains_a_grpo_step(workdir, case, one_thread, capsys):
    method, settings = METHOD_SETTINGS[case]
    recipe = grpo_recipe(workdir, f"m-{case}", method, **settings)
    assert main(["train", str(recipe), "--output_dir", str(workdir / "methods")]) == 0, capsys.readouterr().err
    run = workdir / "methods" / f"m-{case}"
    [record] = read_metrics(run / "metrics.jsonl")
    assert math.isfinite(record["loss"]) and 0 < record["completions/mean_length"] <= 6
    assert ("kl" in record) == bool(settings) and record.get("kl", 0.0) >= 0.0
    output = run / ("model" if case == "full" else "adapter")
    assert (output / "lorakit_run.json").is_file()
    if "grpo_beta" in settings:
        reference = "a frozen copy" if case == "full" else "switched off"
        assert reference in capsys.readouterr().out


def test_a_grpo_run_logs_rewards_kl_clipping_lengths_and_speeds_and_reports_them(workdir, one_thread, capsys, caplog):
    caplog.set_level("INFO", logger="lorakit")
    recipe = grpo_recipe(workdir, "metrics", {"name": "lora", "r": 4, "alpha": 8}, grpo_beta=0.1, max_steps=None,
                         epochs=2, eval_every=2)
    assert main(["train", str(recipe), "--output_dir", str(workdir / "runs")]) == 0
    out = capsys.readouterr().out
    assert "objective grpo: 3 completions per prompt (temperature 1.0; at most 6 tokens), rewards length_penalty " \
           "(x1), contains (x1)" in out and "reference: the same model with its adapter switched off" in out
    assert "pre-flight: one training prompt as the model sees it:" in out and "compile: off (objective grpo" in out
    run = workdir / "runs" / "metrics"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # 9 training prompts, 3 a step, 2 epochs
    names = {"reward", "reward_std", "rewards/length_penalty/mean", "rewards/contains/mean", "completions/mean_length",
             "completions/clipped_ratio", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "sampling_tokens_per_s", "train_tokens_per_s", "sampling_share"}
    assert all(names <= set(r) for r in records)
    assert all(0 < r["sampling_share"] < 1 and r["clip_ratio/region_mean"] == 0.0 for r in records)  # ratio 1
    for record in records:
        parts = record["rewards/length_penalty/mean"] + record["rewards/contains/mean"]
        assert record["reward"] == approx(parts, reduction=TINY)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval_loss"] == approx(-r["eval_reward"], reduction=TINY) for r in evals)
    assert {"eval_rewards/contains/mean", "eval_completions/mean_length"} <= set(evals[0])
    assert f"step 2: eval reward {evals[0]['eval_reward']:.4f} (eval loss = minus it)" in caplog.text  # not "eval loss -0.x"
    report = (run / "report.md").read_text()
    assert "- objective: grpo, 3 completions per prompt" in report and "- validation prompts (one greedy" in report
    record = json.loads((run / "adapter" / "lorakit_run.json").read_text())
    assert record["prompt"]["format"] == "prompt_completion"
    assert load_file(run / "adapter" / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- errors


def test_grpo_settings_are_checked_with_one_line_each():
    cases = [
        (dict(objective="grpo"), r"^train.rewards: objective grpo needs at least one reward: e.g. \[exact_match\]"),
        (dict(rewards=["exact_match"]),
         r"^train.rewards: applies to objective grpo, not sft \(got \['exact_match'\]\)$"),
        (dict(objective="dpo", num_generations=4), r"^train.num_generations: applies to objective grpo, not dpo"),
        (dict(objective="grpo", rewards=["contains"], reference="precomputed"),
         r"^train.reference: objective grpo samples its completions at each step, so their reference log-probs "
         r"cannot be precomputed"),
        (dict(objective="grpo", rewards=["contains"], reference="copy"),
         r"^train.reference: objective grpo has a reference model only with a KL penalty \(grpo_beta > 0\)"),
        (dict(objective="grpo", rewards=["contains"], compile=True), r"^train.compile: objective grpo samples with"),
        (dict(objective="grpo", rewards=["contains"], num_generations=1), r"^train.num_generations: must be >= 2"),
        (dict(objective="grpo", rewards=["contains"], grpo_loss_type="sapo"), r"^train.grpo_loss_type: must be one "
                                                                              r"of grpo, bnpo, dr_grpo, dapo"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**settings)
    cfg = TrainConfig(objective="grpo", rewards=[{"name": "exact_match", "field": "completion"}], grpo_beta=0.04,
                      reference="adapters_off")
    assert cfg.uses_reference and not TrainConfig(objective="grpo", rewards=["contains"]).uses_reference
    assert GRPO_LOSS_TYPES == grpo_loss.GRPO_LOSS_TYPES and REWARD_SCALES == grpo_loss.ADVANTAGE_SCALES
    with pytest.raises(ConfigError, match=r"^train.objective grpo: each rank samples its own prompts' completions"):
        check_parallel(type("FSDPLike", (Parallel,), {"kind": "fsdp"})())


def test_a_grpo_run_refuses_what_it_cannot_train_before_loading_the_model(workdir, tmp_path, capsys):
    recipe = grpo_recipe(workdir, "bad", {"name": "lora", "r": 4, "alpha": 8})
    for overrides, message in (
            (["--train.rewards", "[nope]"], "error: train.rewards[0]: unknown reward 'nope'; built-ins: contains, "
                                            "exact_match, length_penalty, regex, or 'module:function' for your own"),
            (["--data.format", "alpaca"], "error: data.format is alpaca, but train.objective grpo samples answers to "
                                          "prompt rows"),
            (["--data.packing", "true"], "error: data.packing true: train.objective grpo trains on the completions")):
        assert main(["train", str(recipe), "--output_dir", str(tmp_path), *overrides]) == 2
        assert capsys.readouterr().err.startswith(message)
    with pytest.raises(LorakitError, match=r"^train.objective grpo samples its training batches from prompt rows"):
        GRPOObjective(grpo_config(), tiny_lora(), rollout(), None, FP32).units(
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long)})


def test_the_embedded_recipe_is_grpo_from_the_quickstart_adapter_on_exact_match():
    cfg = load_config("grpo-embedded")
    assert cfg.train.objective == "grpo" and cfg.model.init_adapter == "runs/quickstart/adapter"
    assert cfg.train.rewards == [{"name": "exact_match", "field": "completion"}]
    assert (cfg.data.source, cfg.data.val_source) == ("embedded-train", "embedded-eval")
    assert load_config("grpo-embedded", [("model.init_adapter", "null")]).model.init_adapter is None  # from the base
