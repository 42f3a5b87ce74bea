"""lorakit calc: parameter formulas against real models, the lecture's numbers, memory against a measurement."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_bloom, tiny_gpt2, tiny_llama

from lorakit.adapters import METHODS, LoRA, apply, trainable_parameters
from lorakit.analysis.lecture import exercise_1, exercise_2, seven_b_scenarios
from lorakit.analysis.memory import GB, TrainingSetup, estimate
from lorakit.analysis.params import MethodSpec, trainable_by_module, trainable_count
from lorakit.analysis.presets import PRESETS, preset_config
from lorakit.analysis.shapes import shape_from_config
from lorakit.cli import main
from lorakit.errors import ConfigError

# published parameter counts of the preset models
PUBLISHED = {"Llama-3.2-1B": 1_235_814_400, "Llama-3.1-8B": 8_030_261_248, "7B": 6_738_415_616,
             "bloomz-560m": 559_214_592, "SmolLM2-135M": 134_515_008}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_totals_are_the_published_counts(name):
    assert shape_from_config(preset_config(name)).total_params == PUBLISHED[name]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bloom])
def test_full_count_equals_the_model(build):
    model = build()
    assert trainable_count(shape_from_config(model.config), MethodSpec("full")) == trainable_parameters(model)[0]


@pytest.mark.parametrize("build,targets", [(tiny_llama, "all-linear"), (tiny_llama, ["q_proj", "v_proj"]),
                                           (tiny_gpt2, "all-linear"), (tiny_gpt2, ["c_attn"]),
                                           (tiny_bloom, "all-linear"), (tiny_bloom, ["dense_h_to_4h"])])
def test_lora_count_equals_lorakit(build, targets):
    model = build()
    shape = shape_from_config(model.config)
    apply(model, LoRA(r=4, targets=targets))
    assert trainable_count(shape, MethodSpec("lora", r=4, targets=targets)) == trainable_parameters(model)[0]


@pytest.mark.parametrize("block,names", [("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                         ("mlp", ["gate_proj", "up_proj", "down_proj"])])
def test_lora_target_blocks_equal_their_module_lists(block, names):
    shape = shape_from_config(tiny_llama().config)
    assert trainable_by_module(shape, MethodSpec("lora", r=2, targets=block)) == \
        trainable_by_module(shape, MethodSpec("lora", r=2, targets=names))


@pytest.mark.skipif("prompt_tuning" not in METHODS, reason="prompt tuning is not in this build")
def test_prompt_tuning_count_equals_lorakit():
    model = tiny_llama()
    shape = shape_from_config(model.config)
    apply(model, METHODS["prompt_tuning"](num_virtual_tokens=7))
    assert trainable_count(shape, MethodSpec("prompt_tuning", num_virtual_tokens=7)) == trainable_parameters(model)[0]


@pytest.mark.parametrize("method", ["dora", "qlora"])
def test_dora_and_qlora_counts_equal_lorakit(method):
    if method not in METHODS:
        pytest.skip(f"{method} is not in this build")
    model = tiny_llama()
    shape = shape_from_config(model.config)
    apply(model, METHODS[method](r=4, targets=["q_proj", "down_proj"]))
    assert trainable_count(shape, MethodSpec(method, r=4, targets=["q_proj", "down_proj"])) == \
        trainable_parameters(model)[0]


def test_dora_adds_one_magnitude_per_output_row():
    shape = shape_from_config(tiny_llama().config)
    lora, dora = (trainable_count(shape, MethodSpec(m, r=4, targets=["q_proj", "down_proj"])) for m in ("lora", "dora"))
    assert dora - lora == shape.num_layers * (shape.num_heads * shape.head_dim + shape.hidden_size)


def test_unknown_target_names_the_layers():
    with pytest.raises(ConfigError, match="'qkv' matches no layer of this llama model .*q_proj, k_proj"):
        trainable_count(shape_from_config(tiny_llama().config), MethodSpec("lora", targets=["qkv"]))


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
    plain = estimate(shape, MethodSpec("lora"), TrainingSetup(batch_size=4))
    ckpt = estimate(shape, MethodSpec("lora"), TrainingSetup(batch_size=4, gradient_checkpointing=True))
    assert ckpt.activations < plain.activations / 4 and ckpt.weights == plain.weights


def test_calc_cli_prints_the_lecture_and_reads_a_local_config(capsys, tmp_path):
    assert main(["calc", "7B", "--lecture", "--batch-sizes", "1", "--seq-lens", "2048"]) == 0
    out = capsys.readouterr().out
    assert "160,000" in out and "625x fewer" in out and "4,194,304" in out
    tiny_llama().config.save_pretrained(tmp_path)  # config only, no weights
    assert main(["calc", str(tmp_path), "--method", "all"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in tiny_llama().parameters()):,} parameters" in out
    assert "prompt_tuning" in out and "total ckpt" in out


# ----------------------------------------------------------------------------- measured validation

MODEL = dict(model_type="llama", vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512, tie_word_embeddings=False)
JOBS = [  # (method options, spec, batch, seq, gradient checkpointing)
    ({"name": "full"}, MethodSpec("full"), 1, 128, False),  # weights, grads and AdamW state dominate
    ({"name": "lora", "r": 16, "alpha": 32}, MethodSpec("lora", r=16), 2, 256, False),  # activations dominate
    ({"name": "lora", "r": 16, "alpha": 32}, MethodSpec("lora", r=16), 2, 256, True),
]


@pytest.mark.timeout(240)
def test_memory_estimate_within_25_percent_of_measured_peak():
    payload = [dict(config=MODEL, method=options, batch_size=b, seq_len=t, steps=2, gradient_checkpointing=ckpt)
               for options, _, b, t, ckpt in JOBS]
    done = subprocess.run([sys.executable, "-m", "lorakit.analysis.measure", json.dumps(payload)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    shape = shape_from_config(MODEL)
    for (_, spec, b, t, ckpt), peak in zip(JOBS, measured):
        setup = TrainingSetup(batch_size=b, seq_len=t, weight_dtype="fp32", activation_dtype="fp32",
                              gradient_checkpointing=ckpt)
        estimated_mb = estimate(shape, spec, setup).total / 2**20
        measured_mb = peak["peak_mb"] - peak["baseline_mb"]
        assert 0.75 <= estimated_mb / measured_mb <= 1.25, (spec.name, ckpt, estimated_mb, measured_mb)
