"""The auto settings (train.precision, data.packing, train.compile): each rule on faked CPU flags and devices,
the lines a run prints, LORAKIT_AUTO=off, and the auto path's losses against the fp32 unpacked path.

conftest.py sets LORAKIT_AUTO=off for the suite; the tests here that exercise a rule lift it (`auto_on`).
"""
from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch
import torch.nn.functional as F
import yaml
from _tol import TINY, approx, tol
from conftest import tiny_llama
from test_data_packing import MaskDroppingModel, segments
from train_fixtures import TinyLM, epoch_batches, freeze_except, losses, make_examples
from transformers import MistralConfig, MistralForCausalLM

from lorakit import finetune, run
from lorakit.adapters import PromptTuning, apply
from lorakit.config import load_config
from lorakit.data import DataConfig, load_rows, make_batches, tokenize_rows
from lorakit.data.batching import pack_each_batch
from lorakit.errors import ConfigError
from lorakit.models import EMBEDDED_DATASETS
from lorakit.train import TrainConfig, auto, train
from lorakit.train.precision import PRECISIONS
from lorakit.train.setup import prepared

BF16_CPU = {"fpu", "avx2", "avx512f", "avx512_bf16"}
AVX512_ONLY = {"fpu", "avx2", "avx512f", "avx512bw", "avx512vl"}  # converts bf16, but no native bf16 matmuls
CPU = torch.device("cpu")


@pytest.fixture
def auto_on(monkeypatch):
    """The auto rules as a user gets them (the suite runs with LORAKIT_AUTO=off), with a C++ compiler."""
    monkeypatch.delenv(auto.AUTO_ENV, raising=False)
    monkeypatch.setattr(auto, "compiler_missing", lambda device: None)


def fake_cpu(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(auto, "cpu_flags", lambda: set(flags))


def adapter_like():
    return freeze_except(tiny_llama(), "q_proj", "v_proj")


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("flags, expected", [
    (BF16_CPU, "bf16"), ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"), (AVX512_ONLY, "fp32"), (set(), "fp32")])
def test_precision_auto_picks_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, auto_on, flags, expected):
    fake_cpu(monkeypatch, flags)
    choice = auto.resolve_precision("auto", adapter_like())
    assert choice.value == expected
    if expected == "bf16":
        assert choice.line.startswith("precision: bf16 (auto: this CPU runs bf16 natively (")
        assert choice.line.endswith("; train.precision=fp32 to keep fp32)")
    else:
        assert choice.line == ("precision: fp32 (auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 "
                               "flag); train.precision=bf16 to use bf16 anyway)")


def test_precision_auto_for_full_fine_tuning_keeps_fp32_weights(monkeypatch, auto_on):
    fake_cpu(monkeypatch, BF16_CPU)
    assert auto.resolve_precision("auto", tiny_llama()).value == "bf16-autocast"  # every weight trains
    fake_cpu(monkeypatch, AVX512_ONLY)
    assert auto.resolve_precision("auto", tiny_llama()).value == "fp32"


@pytest.mark.parametrize("compute, flags, expected", [
    (torch.bfloat16, AVX512_ONLY, "bf16"), (torch.float32, BF16_CPU, "fp32")])
def test_precision_auto_follows_the_compute_dtype_of_a_4bit_base(monkeypatch, auto_on, compute, flags, expected):
    model = adapter_like()
    model.model.layers[0].mlp.up_proj.weight.quant_state = types.SimpleNamespace(dtype=compute)  # as Params4bit
    fake_cpu(monkeypatch, flags)
    choice = auto.resolve_precision("auto", model)
    assert choice.value == expected
    assert f"the 4-bit base computes in {expected}, its method.compute_dtype" in choice.line


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_precision_auto_reads_the_compute_dtype_of_a_real_qlora_base(monkeypatch, auto_on, compute):
    pytest.importorskip("bitsandbytes")
    from lorakit.adapters import QLoRA

    fake_cpu(monkeypatch, AVX512_ONLY if compute == "bf16" else BF16_CPU)  # the method decides, not the CPU
    model = apply(tiny_llama(), QLoRA(r=4, alpha=8, targets="all-linear", compute_dtype=compute))
    assert auto.resolve_precision("auto", model).value == compute


@pytest.mark.parametrize("native", [True, False])
def test_a_cuda_device_is_asked_for_native_bf16_without_emulation(monkeypatch, native):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: asked.append(kwargs) or native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert auto.native_bf16(torch.device("cuda")) == (
        native, "this GPU (Fake GPU) runs bf16 natively" if native else "this GPU (Fake GPU) has no native bf16")
    assert asked == [{"including_emulation": False}]  # emulated bf16 (pre-Ampere) is slower than fp32


def test_mps_and_other_devices_stay_fp32():
    assert auto.native_bf16(torch.device("mps")) == (False, "bf16 training is not verified on mps")
    assert auto.compiler_missing(torch.device("mps")) == "compiling is not verified on mps"


def test_explicit_settings_are_kept_without_a_line(monkeypatch, auto_on):
    fake_cpu(monkeypatch, BF16_CPU)
    assert auto.resolve_precision("fp32", adapter_like()) == auto.Choice("fp32", "")
    assert auto.resolve_compile(False, CPU, steps=10**6, tokens_per_step=10**3) == auto.Choice(False, "")
    assert auto.resolve_packing(False, adapter_like(), 48) == auto.Choice(False, "")


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch, auto_on):
    examples, lines = make_examples(16, seed=2), []
    cfg = TrainConfig(lr=1e-2, epochs=1, max_steps=2, micro_batch_size=4, save_every=2, progress="none")

    def run(cfg: TrainConfig, resume: bool) -> torch.nn.Module:
        model = adapter_like()
        train(model, cfg, run_dir=tmp_path, resume=resume, log=lines.append,
              train_batches=lambda epoch: epoch_batches(examples, 4, epoch))
        return model

    fake_cpu(monkeypatch, BF16_CPU)
    run(cfg, resume=False)
    fake_cpu(monkeypatch, AVX512_ONLY)  # resumed where auto would now pick fp32
    model = run(dataclasses.replace(cfg, max_steps=4), resume=True)
    assert [line.split(" (")[0] for line in lines if line.startswith("precision")] == ["precision: bf16"] * 2
    assert lines[-2] == "precision: bf16 (auto: kept from the start of the run this one resumes)"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # frozen: stored in bf16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # trained: fp32


# ----------------------------------------------------------------------------- packing


def tiny_mistral(window: int) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=window)
    return MistralForCausalLM(config).float().eval()


def test_packing_auto_is_on_where_the_leak_probe_proves_the_model_exact(auto_on):
    choice = auto.resolve_packing("auto", tiny_llama(), 48, effect="12 examples in 4 rows")
    assert choice == auto.Choice(True, "packing: on (auto: the leak probe shows this model exact on packed rows of "
                                       "48 tokens; 12 examples in 4 rows; data.packing=false to turn it off)")


def test_packing_auto_is_off_for_a_sliding_window_shorter_than_max_length(auto_on):
    choice = auto.resolve_packing("auto", tiny_mistral(window=16), 48)
    assert choice == auto.Choice(False, "packing: off (auto: packing is not exact for model type 'mistral': it uses "
                                        "sliding-window attention (window 16) shorter than data.max_length (48), "
                                        "which a packed row's mask cannot express)")
    assert auto.resolve_packing("auto", tiny_mistral(window=16), 16).value is True  # rows within the window


def test_packing_auto_is_off_for_a_model_the_probe_catches_leaking(auto_on):
    choice = auto.resolve_packing("auto", MaskDroppingModel(tiny_llama()), 48)
    assert choice.value is False
    assert choice.line.startswith("packing: off (auto: packing is not leak-free for model type 'llama'")


def test_packing_auto_is_off_for_prompt_tuning(auto_on):
    model = apply(tiny_llama(), PromptTuning(num_virtual_tokens=4))
    choice = auto.resolve_packing("auto", model, 48)  # the probe runs the adapted model: its hook refuses
    assert choice.value is False
    assert choice.line.startswith("packing: off (auto: packing is not supported for model type 'llama': the model "
                                  "failed on a packed batch (AdapterError: prompt tuning cannot run on packed batches")


def test_packing_each_micro_batch_keeps_its_examples_and_the_unpacked_run(tmp_path):
    """auto's layout: the micro-batches of the unpacked run, each packed; a run on it has the unpacked run's
    steps and, step by step, its losses and weights up to fp32 rounding."""
    examples = make_examples(40, seed=3, min_len=4, max_len=20, learnable=True)
    padded = make_batches(examples, 8, pack=False, max_length=32, pad_id=0, seed=1, epoch=0)
    packed = pack_each_batch(examples, 8, max_length=32, pad_id=0, seed=1, epoch=0)
    assert len(packed) == len(padded) == 5
    for one, other in zip(padded, packed):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(one["input_ids"], one["attention_mask"])]
        found = [other["input_ids"][b, s:e].tolist() for b, s, e in segments(other)]
        assert sorted(rows) == sorted(ids for ids in found if ids != [0])  # the same examples, whole
        assert other["input_ids"].shape[0] < one["input_ids"].shape[0]  # in fewer rows
    runs = {}
    for name, layout in {"padded": functools.partial(make_batches, pack=False), "packed": pack_each_batch}.items():
        model = freeze_except(tiny_llama(), "q_proj", "v_proj")
        cfg = TrainConfig(lr=1e-2, epochs=2, micro_batch_size=8, schedule="constant", progress="none")
        train(model, cfg, run_dir=tmp_path / name, train_batches=lambda epoch, layout=layout: layout(
            examples, 8, max_length=32, pad_id=0, seed=1, epoch=epoch))
        runs[name] = model
    assert losses(tmp_path / "packed") == approx(losses(tmp_path / "padded"), reduction=TINY, steps=10)
    for (name, a), (_, b) in zip(runs["packed"].named_parameters(), runs["padded"].named_parameters()):
        torch.testing.assert_close(a, b, msg=name, **tol(reduction=TINY, steps=10, scale=1e-2 * 10))  # lr * steps


# ----------------------------------------------------------------------------- compile


def test_compile_auto_is_off_for_a_short_run_and_on_for_a_long_one(auto_on):
    short = auto.resolve_compile("auto", CPU, steps=12, tokens_per_step=900)
    assert short == auto.Choice(False, "compile: off (auto: a 12-step run of 10,800 tokens does not pay back "
                                       "compiling, about 6,000,000 do for this model; train.compile=true to force it)")
    long = auto.resolve_compile("auto", CPU, steps=10000, tokens_per_step=900)
    assert long == auto.Choice(True, "compile: on (auto: a 10000-step run of 9,000,000 tokens pays back compiling, "
                                     "about 6,000,000 do for this model; train.compile=false to skip it)")
    assert auto.resolve_compile("auto", CPU, steps=None, tokens_per_step=None).value is False  # length unknown


class _Shaped(torch.nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


def test_compile_break_even_falls_with_the_width_and_depth_of_the_layers(auto_on):
    from transformers import GPT2Config, LlamaConfig

    embedded = _Shaped(LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4))
    smollm = _Shaped(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30))
    assert auto.layer_units(embedded) == 4 * 640 and auto.layer_units(smollm) == 30 * 2112
    assert auto.layer_units(_Shaped(GPT2Config(n_embd=64, n_layer=2))) == 2 * (64 + 256)  # n_inner None: 4 x
    assert auto.compile_break_even(embedded) == 5_700_000  # 90 s / (6.25e-9 s x 2,560), two digits, rounded up
    assert auto.compile_break_even(smollm) == 230_000
    assert auto.compile_break_even(torch.nn.Linear(2, 2)) == auto.COMPILE_BREAK_EVEN_TOKENS  # no config: the default
    long_for_smollm = auto.resolve_compile("auto", CPU, steps=250, tokens_per_step=1160,
                                           break_even=auto.compile_break_even(smollm))
    assert long_for_smollm.value is True and "about 230,000 do for this model" in long_for_smollm.line


def test_compile_auto_is_off_without_a_compiler(monkeypatch):
    monkeypatch.delenv(auto.AUTO_ENV, raising=False)
    monkeypatch.setattr(auto.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    choice = auto.resolve_compile("auto", CPU, steps=10**6, tokens_per_step=10**3)
    assert choice == auto.Choice(False, "compile: off (auto: no C++ compiler (g++) found)")


def test_compile_auto_on_a_long_run_compiles_in_the_loop(tmp_path, monkeypatch, auto_on):
    compiled, lines = [], []
    real_compile = torch.compile

    def fast_compile(model, **kwargs):  # inductor would need minutes on 2 CPU cores; dynamo still traces
        compiled.append(model)
        return real_compile(model, backend="eager", dynamic=False)

    def run_for(name: str, model: torch.nn.Module) -> None:
        examples = make_examples(16, seed=2)  # 4 steps of 4 rows
        train(model, TrainConfig(lr=1e-2, epochs=1, micro_batch_size=4, progress="none"), run_dir=tmp_path / name,
              train_batches=lambda epoch: epoch_batches(examples, 4, epoch), log=lines.append)

    monkeypatch.setattr(torch, "compile", fast_compile)
    fake_cpu(monkeypatch, AVX512_ONLY)
    monkeypatch.setattr(auto, "COMPILE_BREAK_EVEN_TOKENS", 100)  # this tiny run counts as long
    model = TinyLM(seed=1)
    run_for("long", model)
    assert compiled == [model]
    assert lines[0].startswith("precision: fp32 (auto: this CPU has no native bf16")
    assert lines[1].startswith("compile: on (auto: a 4-step run of ")
    assert "pays back compiling, about 100 do for this model" in lines[1]
    monkeypatch.setattr(auto, "COMPILE_BREAK_EVEN_TOKENS", 10**6)
    run_for("short", TinyLM(seed=1))
    assert compiled == [model] and lines[3].startswith("compile: off (auto: a 4-step run of ")


# ----------------------------------------------------------------------------- the switch and the config


def test_lorakit_auto_off_takes_every_conservative_value(monkeypatch):
    monkeypatch.setenv(auto.AUTO_ENV, "off")
    fake_cpu(monkeypatch, BF16_CPU)
    cfg, lines = auto.resolve_train(TrainConfig(), adapter_like(), steps=10**6, tokens_per_step=10**3)
    assert (cfg.precision, cfg.compile) == ("fp32", False)
    assert lines == ["precision: fp32 (auto: LORAKIT_AUTO=off; train.precision=bf16 for bf16)",
                     "compile: off (auto: LORAKIT_AUTO=off; train.compile=true to compile)"]
    assert auto.resolve_packing("auto", tiny_llama(), 48) == auto.Choice(
        False, "packing: off (auto: LORAKIT_AUTO=off; data.packing=true to pack)")
    monkeypatch.setenv(auto.AUTO_ENV, "of")
    with pytest.raises(ConfigError, match="LORAKIT_AUTO='of': must be 'on' or 'off'"):
        auto.auto_enabled()


def test_auto_is_the_default_and_true_false_still_parse():
    assert (TrainConfig().precision, TrainConfig().compile, DataConfig().packing) == ("auto", "auto", "auto")
    assert TrainConfig(compile="yes").compile is True and TrainConfig(compile="auto").compile == "auto"
    assert DataConfig(packing="false").packing is False and DataConfig(packing="true").packing is True
    with pytest.raises(ConfigError) as error:
        DataConfig(packing="sometimes")
    assert str(error.value) == "data.packing: expected bool | {auto} (got 'sometimes')"


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert run.pick_device(None) == expected
    assert run.pick_device("cpu") == "cpu"


# ----------------------------------------------------------------------------- a real run


def test_a_run_prints_each_auto_choice_once_and_reports_them(tmp_path, monkeypatch, auto_on, one_thread):
    fake_cpu(monkeypatch, BF16_CPU)
    lines = []
    result = finetune("quickstart", log=lines.append, **{"name": "auto", "output_dir": str(tmp_path),
                      "train.max_steps": 2, "data.val_source": None, "train.progress": "none"})
    chosen = [line for line in lines if line.startswith(("precision:", "packing:", "compile:"))]
    assert [line.split(" (")[0] for line in chosen] == ["packing: on", "precision: bf16", "compile: off"]
    assert chosen[0].startswith("packing: on (auto: the leak probe shows this model exact on packed rows of 64 "
                                "tokens; each micro-batch keeps its 16 examples, packed: ")
    assert chosen[1] == ("precision: bf16 (auto: this CPU runs bf16 natively (avx512_bf16); "
                         "train.precision=fp32 to keep fp32)")
    assert chosen[2].startswith("compile: off (auto: a 2-step run of ")
    assert all(f"- {line}" in result.report.read_text() for line in chosen)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())  # the settings as given: auto
    assert (saved["train"]["precision"], saved["train"]["compile"], saved["data"]["packing"]) == ("auto",) * 3
    assert next(result.model.parameters()).dtype == torch.bfloat16  # the frozen embedding


def test_the_auto_path_here_gives_the_fp32_unpacked_losses_within_its_dtype_tolerance(monkeypatch, one_thread):
    """On this machine auto picks bf16 (with AVX512-BF16; fp32 elsewhere) and packed rows; per token, the losses
    of the embedded model with the quickstart's LoRA match the fp32 unpacked path within the chosen dtype's bound."""
    monkeypatch.delenv(auto.AUTO_ENV, raising=False)
    cfg = load_config("quickstart")
    tokenizer = run.run_tokenizer(cfg)
    rows, _ = load_rows(dataclasses.replace(cfg.data, source=str(EMBEDDED_DATASETS["embedded-eval"]), val_source=None))
    examples, _ = tokenize_rows(rows[:48], tokenizer, cfg.data)
    model, _ = run.load_adapted_model(cfg, lambda line: None, tokenizer)
    torch.manual_seed(0)
    for layer in model.modules():  # B = 0 makes LoRA a no-op; a trained-like B makes the adapter count in the loss
        if isinstance(getattr(layer, "lora_B", None), torch.nn.Linear):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    precision, packing = auto.resolve_precision("auto", model), auto.resolve_packing("auto", model, cfg.data.max_length)
    assert packing.value is True

    def per_example(precision_name: str, pack: bool) -> dict[tuple, torch.Tensor]:
        found = {}
        with prepared(model, TrainConfig(precision=precision_name, compile=False)) as call:
            layout = pack_each_batch if pack else functools.partial(make_batches, pack=False)
            for batch in layout(examples, 8, max_length=cfg.data.max_length, pad_id=1, seed=0, epoch=0):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with torch.no_grad(), PRECISIONS[precision_name].autocast(CPU):
                    logits = call(**inputs).logits.float()  # (B, T, V)
                token = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
                spans = segments(batch) if pack else [(b, 0, int(batch["attention_mask"][b].sum()))
                                                      for b in range(len(token))]
                for b, s, e in spans:
                    found.setdefault(tuple(batch["input_ids"][b, s:e].tolist()), token[b, s:e])
        return found

    reference = per_example("fp32", pack=False)  # first: the bf16 mode stores the frozen weights in bf16
    fast = per_example(precision.value, pack=True)
    assert set(reference) <= set(fast)
    dtype = torch.float32 if precision.value == "fp32" else torch.bfloat16
    for key, expected in reference.items():
        torch.testing.assert_close(fast[key], expected, **tol(dtype))
