"""The user's path: a missing optional dependency is one line naming its extra (never a traceback),
`lorakit.finetune` trains from Python exactly as `lorakit train` does, and a notebook gets a
progress bar that redraws in place instead of one output line per update."""
from __future__ import annotations

import io
import sys
import types

import pytest
import torch
import yaml

import lorakit
from conftest import tiny_llama
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.optional import MissingDependency, require
from lorakit.train import progress
from lorakit.train.progress import BarProgress, CarriageReturnBar, PlainProgress, TqdmProgress, make_progress
from train_fixtures import run_tiny

SERVE_HINT = "install the 'serve' extra: pip install 'lorakit[serve]' (from a checkout: pip install -e '.[serve]')"
QUANT_HINT = "install the 'quant' extra: pip install 'lorakit[quant]' (from a checkout: pip install -e '.[quant]')"
# a run of the embedded quickstart recipe cut to two steps on eight rows
SHORT = {"train.max_steps": 2, "data.limit": 8, "data.val_limit": 4}


def hide(monkeypatch, *modules: str) -> None:
    """Make `import module` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


# ----------------------------------------------------------------------------- optional dependencies


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("yaml", "serve", "x") is yaml
    hide(monkeypatch, "uvicorn")
    with pytest.raises(MissingDependency) as error:
        require("uvicorn", "serve", "lorakit serve")
    assert str(error.value) == f"lorakit serve needs uvicorn, which is not installed; {SERVE_HINT}"
    assert isinstance(error.value, lorakit.errors.LorakitError) and isinstance(error.value, ImportError)


def test_a_package_that_is_there_but_breaks_on_import_is_named_as_such(tmp_path, monkeypatch):
    (tmp_path / "lorakit_broken_pkg").mkdir()
    (tmp_path / "lorakit_broken_pkg" / "__init__.py").write_text("import lorakit_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency) as error:
        require("lorakit_broken_pkg", "quant", "QLoRA")
    assert str(error.value) == (
        "QLoRA needs lorakit_broken_pkg, which is installed but fails to import (No module named "
        "'lorakit_no_such_module_xyz'); reinstall the 'quant' extra: pip install 'lorakit[quant]' "
        "(from a checkout: pip install -e '.[quant]')")


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_its_extra_is_one_line_and_exit_2(missing, monkeypatch, capsys):
    hide(monkeypatch, missing)
    assert main(["serve", "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: lorakit serve needs {missing}, which is not installed; {SERVE_HINT}\n"
    assert captured.out == ""  # refused before loading the model


def test_train_qlora_without_bitsandbytes_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "bitsandbytes")
    args = ["train", "quickstart", "method=qlora", f"output_dir={tmp_path}", *(f"{k}={v}" for k, v in SHORT.items())]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: QLoRA (method qlora) needs bitsandbytes, which is not installed; {QUANT_HINT}\n")
    assert not any(tmp_path.iterdir())


def test_qlora_apply_from_python_without_bitsandbytes_leaves_the_model_unchanged(monkeypatch):
    hide(monkeypatch, "bitsandbytes")
    model = tiny_llama()
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(MissingDependency, match=r"^QLoRA \(method qlora\) needs bitsandbytes, which is not installed; "):
        lorakit.apply(model, lorakit.QLoRA(r=2, targets="all-linear"))
    assert {name: type(module) for name, module in model.named_modules()} == before


# ----------------------------------------------------------------------------- notebook progress


class FakeShell:
    """What IPython.get_ipython() returns: a kernel's shell has a `kernel`, a terminal's has none."""

    def __init__(self, kernel):
        self.kernel = kernel


def fake_ipython(monkeypatch, shell) -> None:
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", ipython)


def test_notebook_detection_needs_a_running_kernel(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert progress.in_notebook() is False
    fake_ipython(monkeypatch, FakeShell(kernel=None))  # ipykernel imported, but a terminal IPython
    assert progress.in_notebook() is False
    fake_ipython(monkeypatch, None)  # IPython loaded, no shell running
    assert progress.in_notebook() is False
    fake_ipython(monkeypatch, FakeShell(kernel=object()))
    assert progress.in_notebook() is True
    assert isinstance(make_progress("auto", total_steps=3, stream=io.StringIO()), TqdmProgress)


def _drive(bar, steps: int = 20) -> None:
    for step in range(1, steps + 1):
        bar.advance(step)
        if step % 5 == 0:
            bar.report(step, loss=2.0 / step, tokens_per_s=1000.0, lr=1e-3)
    bar.message("step 10: eval loss 0.5000")
    bar.close()


def test_auto_in_a_notebook_is_a_bar_that_redraws_in_place(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    stream = io.StringIO()
    bar = make_progress("auto", total_steps=20, stream=stream)
    assert isinstance(bar, TqdmProgress)
    _drive(bar)
    text = stream.getvalue()
    assert "[lorakit]" not in text and "\r" in text
    assert text.count("\n") <= 2  # the message and the closing newline, not one line per update
    assert "20/20" in text and "loss 0.1000" in text and "1,000 tok/s" in text
    assert "step 10: eval loss 0.5000\n" in text
    # a terminal still gets the ANSI bar; a pipe outside a notebook still gets plain lines
    assert isinstance(make_progress("auto", 3, stream=FakeTerminal()), BarProgress)
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    assert isinstance(make_progress("auto", 3, stream=io.StringIO()), PlainProgress)


def test_notebook_without_tqdm_gets_a_carriage_return_bar_without_ansi_codes(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    hide(monkeypatch, "tqdm")
    stream = io.StringIO()
    bar = make_progress("auto", total_steps=20, stream=stream)
    assert type(bar) is CarriageReturnBar
    _drive(bar)
    text = stream.getvalue()
    assert "\033" not in text and text.count("\n") == 2
    draws = text.split("\n")[-2].split("\r")[1:]  # redraws after the message line
    assert "[########################] step 20/20 | loss 0.1000" in draws[-1]
    assert len({len(draw) for draw in draws}) == 1  # shorter draws are padded over longer ones


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_loop_in_a_notebook_draws_one_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    run_tiny(tmp_path, epochs=1, log_every=1, progress="auto")
    err = capsys.readouterr().err
    assert "[lorakit] step" not in err and "4/4" in err and err.count("\n") <= 1


# ----------------------------------------------------------------------------- lorakit.finetune


def _normalised(text: str, out) -> list[str]:
    """The printed lines without what depends on the clock (time to first step) or on the cache's state."""
    lines = text.replace(str(out), "OUT").splitlines()
    return [line for line in lines if not line.startswith(("time to first step:", "data: tokenized"))]


def test_finetune_is_lorakit_train_from_python(tmp_path, capsys, monkeypatch, one_thread):
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    assert main(["train", "quickstart", "--train.lr", "3e-4", f"output_dir={cli_out}",
                 *(f"{k}={v}" for k, v in SHORT.items())]) == 0
    cli = capsys.readouterr()

    monkeypatch.setattr(progress, "in_notebook", lambda: True)  # as in Jupyter: stderr is not a terminal
    run = lorakit.finetune("quickstart", overrides={"train.lr": 3e-4}, output_dir=str(py_out), **SHORT)
    py = capsys.readouterr()

    assert run.run_dir == py_out / "quickstart" and run.output == run.run_dir / "adapter"
    assert (run.output / "adapter_model.safetensors").is_file() and (run.output / "adapter_config.json").is_file()
    assert run.report.is_file() and (run.run_dir / "summary.json").is_file()
    assert run.summary.steps == 2 and [r["step"] for r in run.metrics] == [2]
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert (saved["train"]["lr"], saved["train"]["max_steps"], saved["data"]["limit"]) == (3e-4, 2, 8)
    assert saved["name"] == "quickstart" and saved["output_dir"] == str(py_out)
    ids = run.tokenizer("Question: What is the capital of Peru?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert run.model(input_ids=ids).logits.shape[:2] == ids.shape  # the trained model, ready to use

    # the same lines as the command; the progress is a bar, not a line per step
    assert _normalised(py.out, py_out) == _normalised(cli.out, cli_out)
    assert py.out.splitlines()[-1] == f"done: {run.report}"
    assert "[lorakit] step 2/2" in cli.err and "[lorakit] step" not in py.err and "2/2" in py.err

    again = lorakit.finetune("quickstart", output_dir=str(py_out), log=lambda line: None, **SHORT)
    assert again.run_dir == py_out / "quickstart-2"  # never clobbers an earlier run


@pytest.mark.parametrize("override, cli_word", [
    ({"train.lrr": 3e-4}, "train.lrr=3e-4"),
    ({"method.r": 0}, "method.r=0"),
    ({"trian.lr": 1}, "trian.lr=1"),
])
def test_a_bad_override_is_the_same_config_error_as_the_cli(override, cli_word, tmp_path, capsys):
    assert main(["train", "quickstart", cli_word, f"output_dir={tmp_path}"]) == 2
    cli_line = capsys.readouterr().err
    with pytest.raises(ConfigError) as error:
        lorakit.finetune("quickstart", output_dir=str(tmp_path), **override)
    assert f"error: {error.value}\n" == cli_line
    assert not any(tmp_path.iterdir())


def test_finetune_refuses_a_key_given_twice_and_a_config_of_the_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"^'train.lr' is given twice \(0.001 and 0.002\)$"):
        lorakit.finetune("quickstart", overrides={"train.lr": 1e-3}, **{"train.lr": 2e-3})
    with pytest.raises(ConfigError, match="^finetune: config must be a RunConfig, a dict, a YAML path or a recipe "
                                          "name, got int$"):
        lorakit.finetune(3)
    with pytest.raises(ConfigError, match="is a folder without a config.yaml"):
        lorakit.finetune(tmp_path)
