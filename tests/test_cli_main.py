"""The `lorakit` entry point in-process: dispatch, --help from the dataclasses, error handling."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest
import yaml

from lorakit import cli
from lorakit.adapters import METHODS
from lorakit.config import ModelConfig, load_config
from lorakit.data import DataConfig
from lorakit.errors import DataError
from lorakit.fielddocs import field_docs
from lorakit.train import TrainConfig


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "rows.jsonl"}, "method": {"name": "lora", "r": 4}}))
    return path


def words(text: str) -> str:
    return " ".join(text.split())


def test_top_level_help_lists_commands_without_importing_them(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_every_command_builds_its_help_without_torch():
    """The import boundary (lorakit.commands): `lorakit CMD --help` loads none of the heavy libraries."""
    script = ("import sys\nfrom lorakit import cli\nfor name in cli.COMMANDS:\n    cli.build_parser([name])\n"
              "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_train_help_lists_every_field_with_its_doc(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = words(capsys.readouterr().out)
    sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, **{"method": c for c in METHODS.values()}}
    expected = [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)]
    expected += [("method", cls) for cls in METHODS.values()]
    for section, cls in expected:
        for name, doc in field_docs(cls).items():
            assert f"--{section}.{name}" in out
            assert doc and words(doc)[:40] in out, f"{section}.{name} has no doc in --help"
    assert sections and "--method.name {" in out and "--resume" in out


def test_unknown_option_names_the_closest_key(capsys):
    assert cli.main(["train", "--data.max_lenght", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: unknown key 'data.max_lenght'; did you mean 'data.max_length'?\n"
    assert cli.main(["train", "--train.l", "3"]) == 2  # no silent prefix matching
    assert capsys.readouterr().err == "error: unknown key 'train.l'; did you mean 'train.lr'?\n"


@pytest.mark.parametrize("argv, message", [
    (["data.max_lenght=3"], "unknown key 'data.max_lenght'; did you mean 'data.max_length'?"),
    (["--train.lr", "abc"], "train.lr: expected float (got 'abc')"),
    (["--train.lr", "1e-3", "train.lr=2e-3"], "'train.lr' is given twice ('1e-3' and '2e-3')"),
    (["--method.r", "0"], "method.r: must be > 0 (got 0)"),
    (["stray"], "unexpected argument 'stray': overrides are written key=value or --key value"),
])
def test_config_errors_exit_2_with_one_line(recipe, capsys, argv, message):
    assert cli.main(["train", str(recipe), *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: config '{tmp_path / 'nope.yaml'}' is neither a file nor a shipped recipe")


def test_both_override_forms_and_flags_reach_the_config(recipe, monkeypatch):
    seen = {}

    def fake_run_training(cfg, resume, log=print):
        seen.update(cfg=cfg, resume=resume)
        return types.SimpleNamespace(report="report.md")

    monkeypatch.setattr("lorakit.run.run_training", fake_run_training)
    assert cli.main(["train", "--train.compile", "yes", str(recipe), "method.alpha=8", "--data.columns", "{prompt: act}",
                     "--method.targets", "[q_proj, v_proj]", "--resume", "--name", "x"]) == 0
    cfg = seen["cfg"]
    assert seen["resume"] is True and cfg.name == "x" and cfg.train.compile is True
    assert (cfg.method.r, cfg.method.alpha, cfg.method.targets) == (4, 8.0, ["q_proj", "v_proj"])
    assert cfg.data.columns == {"prompt": "act"}


def _fake_command(monkeypatch, run):
    module = types.ModuleType("lorakit_fake_command")
    module.add_arguments = lambda parser: None
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a test command"))


def test_lorakit_error_prints_message_without_traceback(monkeypatch, capsys):
    def fail(args):
        raise DataError("row 3: field 'completion' is missing")
    _fake_command(monkeypatch, fail)
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "error: row 3: field 'completion' is missing\n"


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    _fake_command(monkeypatch, interrupted)
    assert cli.main(["fake"]) == 130


def test_unavailable_command_does_not_break_the_others(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("lorakit.no_such_module", "missing"))
    assert cli.main(["ghost"]) == 2
    assert capsys.readouterr().err == "error: command 'ghost' is not available: module lorakit.no_such_module is missing\n"
    assert cli.main(["--help"]) == 0


def test_unrecognized_arguments_of_other_commands_are_usage_errors(monkeypatch, capsys):
    _fake_command(monkeypatch, lambda args: 0)
    assert cli.main(["fake", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_run_folder_name_is_derived_and_never_clobbers(tmp_path):
    from lorakit.run import free_run_dir

    runs = tmp_path / "runs"
    assert free_run_dir(runs, "r").name == "r"
    (runs / "r").mkdir(parents=True)
    assert free_run_dir(runs, "r").name == "r"  # an empty folder is free
    (runs / "r" / "config.yaml").write_text("{}")
    assert free_run_dir(runs, "r").name == "r-2"


def test_resume_refuses_a_changed_config(recipe, tmp_path):
    from lorakit.config import save_config
    from lorakit.errors import ConfigError
    from lorakit.run import check_run_dir

    cfg = load_config(recipe, [("output_dir", str(tmp_path))])
    with pytest.raises(ConfigError, match="cannot resume: .* holds no config.yaml"):
        check_run_dir(cfg, resume=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"^run folder .* already exists; pass --resume"):
        check_run_dir(cfg, resume=False)
    check_run_dir(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress="none")), resume=True)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1.0))
    with pytest.raises(ConfigError, match=r"different config \(train.lr: 0.0002 -> 1.0\)"):
        check_run_dir(changed, resume=True)


def test_params_prints_the_lora_parameter_count_of_the_embedded_model(capsys):
    import json

    from lorakit.models import EMBEDDED_DIR

    assert cli.main(["params", "--method.r", "4", "--method.targets", "[q_proj, v_proj]"]) == 0
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_out, v_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    expected = config["num_hidden_layers"] * 4 * ((hidden + q_out) + (hidden + v_out))  # r * (d_in + d_out)
    assert f"trainable params: {expected:,} " in capsys.readouterr().out


def test_method_switch_drops_the_files_method_keys_but_method_name_keeps_them(recipe, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("lorakit.run.run_training",
                        lambda cfg, resume, log=print: seen.update(cfg=cfg) or types.SimpleNamespace(report="r"))
    assert cli.main(["train", str(recipe), "--method", "full"]) == 0
    assert type(seen["cfg"].method).name == "full"
    assert cli.main(["train", str(recipe), "--method.name", "full"]) == 2  # the file's r: 4 does not fit full
    assert capsys.readouterr().err == "error: unknown key 'method.r' for method 'full'; valid keys: method.name\n"


def test_a_key_inside_a_mapping_field_says_the_mapping_is_set_whole(capsys):
    assert cli.main(["train", "--method.name", "modality", "--method.modalities.image.r", "2"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown key 'method.modalities.image.r'; 'method.modalities' is one mapping, set as a whole (in YAML, "
        "or on the command line as --method.modalities '{...}'); the keys inside it are not config keys\n")
