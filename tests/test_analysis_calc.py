"""lorakit calc: counts on meta skeletons against real models, the lecture's numbers, memory against a measurement."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_bloom, tiny_gpt2, tiny_llama

from lorakit.adapters import (METHODS, Bottleneck, DoRA, Full, LoRA, MoLE, PromptTuning, QLoRA, apply,
                              trainable_parameters)
from lorakit.analysis.lecture import exercise_1, exercise_2, seven_b_scenarios
from lorakit.analysis.memory import GB, TrainingSetup, estimate
from lorakit.analysis.params import method_count
from lorakit.analysis.presets import PRESETS, preset_config
from lorakit.analysis.shapes import shape_from_config
from lorakit.cli import main
from lorakit.config import load_config
from lorakit.errors import ConfigError, LorakitError

# published parameter counts of the preset models
PUBLISHED = {"Llama-3.2-1B": 1_235_814_400, "Llama-3.1-8B": 8_030_261_248, "7B": 6_738_415_616,
             "bloomz-560m": 559_214_592, "SmolLM2-135M": 134_515_008}


def applied(build, method) -> int:
    """Trainable parameters of the real (weighted) tiny model with `method` applied."""
    return trainable_parameters(apply(build(), method))[0]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_totals_are_the_published_counts(name):
    count = method_count(name, Full())
    assert count.total == count.trainable == PUBLISHED[name]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bloom])
def test_full_count_equals_the_model(build):
    assert method_count(build().config, Full()).trainable == applied(build, Full())


@pytest.mark.parametrize("build,targets", [(tiny_llama, "all-linear"), (tiny_llama, ["q_proj", "v_proj"]),
                                           (tiny_gpt2, "all-linear"), (tiny_gpt2, ["c_attn"]),
                                           (tiny_bloom, "all-linear"), (tiny_bloom, ["dense_h_to_4h"])])
def test_lora_count_equals_lorakit(build, targets):
    method = LoRA(r=4, targets=targets)
    assert method_count(build().config, method).trainable == applied(build, method)


@pytest.mark.parametrize("block,names", [("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                         ("mlp", ["gate_proj", "up_proj", "down_proj"])])
def test_lora_target_blocks_equal_their_module_lists(block, names):
    config = tiny_llama().config
    by_block = method_count(config, LoRA(r=2, targets=block))
    assert by_block.groups == method_count(config, LoRA(r=2, targets=names)).groups
    assert by_block.method.targets == block  # the count keeps the config as given


def test_prompt_tuning_count_equals_lorakit():
    method = PromptTuning(num_virtual_tokens=7)
    assert method_count(tiny_llama().config, method).trainable == applied(tiny_llama, method)


@pytest.mark.parametrize("method_cls", [DoRA, QLoRA])
def test_dora_and_qlora_counts_equal_lorakit(method_cls):
    method = method_cls(r=4, targets=["q_proj", "down_proj"])
    assert method_count(tiny_llama().config, method).trainable == applied(tiny_llama, method)


@pytest.mark.parametrize("build,leaf", [(tiny_llama, "q_proj"), (tiny_gpt2, "c_attn"), (tiny_bloom, "query_key_value")])
def test_bottleneck_and_mole_counts_equal_lorakit(build, leaf):
    for method in (Bottleneck(size=8), Bottleneck(size=4, placement="mlp"), MoLE(r=2, num_experts=3),
                   MoLE(r=2, num_experts=3, top_k=1, targets=[leaf])):
        assert method_count(build().config, method).trainable == applied(build, method), method


def test_dora_adds_one_magnitude_per_output_row():
    config = tiny_llama().config
    lora, dora = (method_count(config, cls(r=4, targets=["q_proj", "down_proj"])).trainable for cls in (LoRA, DoRA))
    head_dim = config.hidden_size // config.num_attention_heads
    assert dora - lora == config.num_hidden_layers * (config.num_attention_heads * head_dim + config.hidden_size)


def test_rank_sum_and_linear_params_come_from_the_skeleton():
    config = tiny_llama().config
    count = method_count(config, LoRA(r=4, targets=["q_proj", "v_proj"]))
    assert count.rank_sum == 4 * 2 * config.num_hidden_layers
    assert method_count(config, Full()).rank_sum == 0
    model = tiny_llama()
    assert count.linear_params == count.total - sum(p.numel() for n, p in model.named_parameters()
                                                    if "proj" not in n)


def test_unknown_target_names_close_modules():
    with pytest.raises(LorakitError, match=r"target 'vproj' matches no module of LlamaForCausalLM; "
                                           r"closest module names: v_proj"):
        method_count(tiny_llama().config, LoRA(targets=["q_proj", "vproj"]))


def test_every_registered_method_counts_on_a_preset():
    counts = {name: method_count("SmolLM2-135M", cls()) for name, cls in METHODS.items()}
    assert set(counts) >= {"full", "lora", "dora", "qlora", "prompt_tuning", "bottleneck", "mole"}
    assert counts["lora"].method.r == 8  # the method's own default, as peft's
    assert counts["qlora"].groups == counts["lora"].groups  # nothing is quantised on a skeleton
    assert all(0 < c.trainable <= c.total for c in counts.values())


def test_lecture_exercises():
    assert exercise_1() == (100_000_000, 160_000, 625.0)
    assert exercise_2() == (4_194_304, 6_738_415_616)


def test_seven_b_claims_hold_only_under_their_assumptions():
    totals = {s.label.split(",")[0] + ("8bit" if "8-bit" in s.label else "") + ("mp" if "master" in s.label else "")
              + ("ckpt" if "checkpointing" in s.label and "no check" not in s.label else ""): e.total / GB
              for s, e in seven_b_scenarios()}
    assert totals["fullmpckpt"] > 100  # standard mixed precision AdamW: 16 bytes per parameter
    assert totals["full8bitckpt"] < 50
    assert totals["LoRA r16 all-linearckpt"] < 20
    assert totals["QLoRA r16 all-linearckpt"] < 10


def test_checkpointing_lowers_the_activation_estimate():
    shape = shape_from_config(preset_config("7B"))  # 32k vocabulary: the layers' activations dominate
    count = method_count("7B", LoRA(r=16))
    plain = estimate(shape, count, TrainingSetup(batch_size=4))
    ckpt = estimate(shape, count, TrainingSetup(batch_size=4, gradient_checkpointing=True))
    assert ckpt.activations < plain.activations / 4 and ckpt.weights == plain.weights


def test_calc_cli_prints_the_lecture_and_reads_a_local_config(capsys, tmp_path):
    assert main(["calc", "7B", "--lecture", "--batch-sizes", "1", "--seq-lens", "2048"]) == 0
    out = capsys.readouterr().out
    assert "160,000" in out and "625x fewer" in out and "4,194,304" in out
    assert "trainable parameters (lora, r=8, targets=all-linear)" in out  # LoRA's own default rank
    tiny_llama().config.save_pretrained(tmp_path)  # config only, no weights
    assert main(["calc", str(tmp_path), "--method", "all"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in tiny_llama().parameters()):,} parameters" in out
    assert "total ckpt" in out
    for name in METHODS:
        assert f"trainable parameters ({name}" in out and f"\n  {name:<14}" in out


def test_calc_cli_method_fields_as_words_options_and_shorthands(capsys, tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    expected = applied(tiny_llama, DoRA(r=4, targets=["q_proj", "v_proj"]))
    for argv in (["--method", "dora", "method.r=4", "method.targets=[q_proj, v_proj]"],
                 ["--method.name", "dora", "--method.r", "4", "--method.targets", "[q_proj, v_proj]"],
                 ["method=dora", "--r", "4", "--targets", "q_proj,v_proj"]):
        assert main(["calc", str(tmp_path), *argv]) == 0, argv
        out = capsys.readouterr().out
        assert "trainable parameters (dora, r=4, targets=['q_proj', 'v_proj'])" in out
        assert f"  {'total':<24}{expected:>16,}" in out


def test_calc_cli_reads_the_method_section_of_a_run_config(capsys, tmp_path):
    tiny_llama().config.save_pretrained(tmp_path / "model")
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "model")},
                                          "method": {"name": "mole", "r": 2, "num_experts": 3,
                                                     "targets": ["q_proj"]}}))
    assert main(["calc", "--config", str(run_config), "method.top_k=2"]) == 0  # MODEL: the run config's
    out = capsys.readouterr().out
    expected = applied(tiny_llama, MoLE(r=2, num_experts=3, targets=["q_proj"], top_k=2))
    assert "trainable parameters (mole, r=2, targets=['q_proj'], num_experts=3, top_k=2)" in out
    assert f"  {'total':<24}{expected:>16,}" in out
    assert main(["calc", "7B", "--config", str(run_config), "--method", "lora"]) == 0  # --method drops its keys
    assert "trainable parameters (lora, r=8, targets=all-linear)" in capsys.readouterr().out


@pytest.mark.parametrize("words,overrides", [
    (["method.r=0"], [("method.r", "0")]),
    (["method.rr=4"], [("method.rr", "4")]),
    (["--method.dropout", "2"], [("method.dropout", "2")]),
    (["method=lorra"], [("method", "lorra")]),
    (["--method", "prompt_tuning", "method.r=4"], [("method", "prompt_tuning"), ("method.r", "4")]),
])
def test_bad_method_field_is_the_error_of_lorakit_train(capsys, words, overrides):
    with pytest.raises(ConfigError) as train_error:
        load_config(None, overrides)  # what `lorakit train KEY=VALUE ...` builds (the quickstart recipe + keys)
    assert main(["calc", "embedded", *words]) == 2
    assert capsys.readouterr().err.strip() == f"error: {train_error.value}"


def test_calc_cli_unknown_target_and_stray_keys(capsys):
    assert main(["calc", "embedded", "--targets", "q_proj,vproj"]) == 2
    assert "target 'vproj' matches no module" in capsys.readouterr().err
    assert main(["calc", "embedded", "train.lr=1"]) == 2
    assert "method keys only" in capsys.readouterr().err
    assert main(["calc", "embedded", "--seq-len", "8"]) == 2  # not a method key: no closest train key offered
    assert "unrecognized arguments: --seq-len" in capsys.readouterr().err


# ----------------------------------------------------------------------------- measured validation

MODEL = dict(model_type="llama", vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512, tie_word_embeddings=False)
JOBS = [  # (method, batch, seq, gradient checkpointing)
    (Full(), 1, 128, False),  # weights, grads and AdamW state dominate
    (LoRA(r=16, alpha=32), 2, 256, False),  # activations dominate
    (LoRA(r=16, alpha=32), 2, 256, True),
]


@pytest.mark.timeout(240)
def test_memory_estimate_within_25_percent_of_measured_peak():
    payload = [dict(config=MODEL, method={"name": method.name, **dataclasses.asdict(method)}, batch_size=b,
                    seq_len=t, steps=2, gradient_checkpointing=ckpt) for method, b, t, ckpt in JOBS]
    done = subprocess.run([sys.executable, "-m", "lorakit.analysis.measure", json.dumps(payload)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    shape = shape_from_config(MODEL)
    for (method, b, t, ckpt), peak in zip(JOBS, measured):
        setup = TrainingSetup(batch_size=b, seq_len=t, weight_dtype="fp32", activation_dtype="fp32",
                              gradient_checkpointing=ckpt)
        estimated_mb = estimate(shape, method_count(MODEL, method), setup).total / 2**20
        measured_mb = peak["peak_mb"] - peak["baseline_mb"]
        assert 0.75 <= estimated_mb / measured_mb <= 1.25, (method.name, ckpt, estimated_mb, measured_mb)
