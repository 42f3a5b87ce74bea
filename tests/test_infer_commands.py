"""`lorakit generate`, `compare` and `merge` on the embedded model and tiny Llama / GPT-2 / BLOOM folders."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _tol import TINY, tol
from _infer_fixtures import random_adapter
from _tiny import CHATML, tiny_tokenizer
from conftest import TINY_MODELS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.commands.compare import parse_adapters, to_html, to_markdown
from lorakit.errors import LorakitError
from lorakit.commands.inputs import read_prompts
from lorakit.models import load_model


def _model_folder(arch: str, tmp_path):
    """A tiny model + tokenizer folder and a random adapter that names it as its base."""
    folder = tmp_path / arch
    build = lambda: TINY_MODELS[arch](vocab_size=320)  # noqa: E731  (the tiny tokenizer's vocabulary)
    build().save_pretrained(folder)
    tiny_tokenizer(CHATML).save_pretrained(folder)
    adapter = random_adapter(build, tmp_path / f"{arch}-adapter", seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(folder)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return folder, adapter


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_generate_compare_merge_on_tiny_models(arch, tmp_path, capsys, one_thread):
    folder, adapter = _model_folder(arch, tmp_path)
    assert main(["generate", "Hello world", "--adapter", str(adapter), "--max-new-tokens", "5"]) == 0
    assert main(["generate", "Hello", "--model", str(folder), "--temperature", "0.9", "--top-p", "0.9",
                 "--repetition-penalty", "1.3", "--max-new-tokens", "4", "--raw"]) == 0
    report = tmp_path / "compare.md"
    assert main(["compare", "Hello world", "The quick", "--adapter", f"tuned={adapter}", "--max-new-tokens", "6",
                 "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "### prompt 1: Hello world" in out and "tuned" in out
    table = report.read_text()
    assert table.startswith("| prompt | base | tuned |") and table.count("\n") == 4
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    _check_merged(tmp_path / "merged", folder, adapter, tmp_path, isolated=arch == "llama")


def _check_merged(merged, base_folder, adapter, tmp_path, isolated: bool):
    """Plain transformers loads the folder (`isolated`: in a process where lorakit cannot be imported);
    its logits equal base + adapter."""
    config = json.loads((merged / "config.json").read_text())
    assert "lorakit" not in json.dumps(config)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lorakit"] = None  # any import of lorakit now fails
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()
        with torch.no_grad():
            save_file({{"logits": model(torch.tensor({ids.tolist()})).logits}}, {str(tmp_path / 'logits.st')!r})
    """)
    if isolated:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    else:
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        save_file({"logits": logits}, str(tmp_path / "logits.st"))
    expected_model = lorakit.load_adapter(load_model(base_folder), adapter).eval()
    with torch.no_grad():
        expected = expected_model(ids).logits
        base = load_model(base_folder).eval()(ids).logits
    got = load_file(str(tmp_path / "logits.st"))["logits"]
    # merged weights vs the adapter: roundings at the size of the largest logits (the row's matmul terms)
    torch.testing.assert_close(got, expected, **tol(reduction=TINY, scale=float(expected.abs().max())))
    assert not torch.allclose(got, base, atol=1e-3)


def test_generate_and_compare_on_embedded(tmp_path, capsys, one_thread):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n{"prompt": "Hello"}\n')
    assert main(["generate", "--prompts-file", str(prompts), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("### prompt") == 2
    report = tmp_path / "c.html"
    adapter = random_adapter(lambda: load_model("embedded"), tmp_path / "emb-adapter", seed=3)
    assert main(["generate", "--adapter", str(adapter), "What is the capital of France?", "--max-new-tokens", "4",
                 "--model", "embedded"]) == 0
    flagged = capsys.readouterr().out
    assert main(["generate", str(adapter), "What is the capital of France?", "--max-new-tokens", "4",
                 "--model", "embedded"]) == 0
    first = capsys.readouterr().out  # a folder first is the adapter (or run), not a prompt: the same answer
    assert f"{adapter}: a folder, read as --adapter {adapter}" in first and first.count("### prompt") == 1
    assert first.split("### prompt 1")[1] == flagged.split("### prompt 1")[1]
    assert main(["compare", "What is the capital of France?", "--adapter", str(adapter), "--model", "embedded",
                 "--out", str(report), "--max-new-tokens", "4"]) == 0
    assert report.read_text().startswith("<!doctype html>") and "emb-adapter" in report.read_text()
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--model", "embedded"]) == 0
    _check_merged(tmp_path / "merged", "embedded", adapter, tmp_path, isolated=False)


def test_prompt_files_and_report_rendering(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("one\n\ntwo | x\n")
    assert read_prompts(["zero"], str(lines)) == ["zero", "one", "two | x"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(LorakitError, match="line 2: no string field 'prompt'"):
        read_prompts([], str(bad))
    assert to_markdown(["a|b"], {"base": ["x"]}) == "| prompt | base |\n| --- | --- |\n| a\\|b | x |\n"
    assert "&lt;b&gt;" in to_html(["<b>"], {"base": ["x"]})
    assert parse_adapters(["runs/a", "z=runs/b"]) == {"a": "runs/a", "z": "runs/b"}
    assert list(parse_adapters(["runs/a/adapter", "runs/b/adapter", "runs/c/model"])) == ["a", "b", "c"]
    with pytest.raises(LorakitError, match="the name 'a' is taken by x/a; name it with --adapter NAME=y/a"):
        parse_adapters(["x/a", "y/a"])
    with pytest.raises(LorakitError, match="the name 'base' is taken for the base model"):
        parse_adapters(["runs/base/adapter"])
