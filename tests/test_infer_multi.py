"""Per-row multi-adapter batches equal each adapter run alone (LoRALayer + load_adapter oracle)."""
from __future__ import annotations

import pytest
import torch
from _tol import TINY, tol
from _infer_fixtures import check_rows_decode_alone, random_adapter
from conftest import TINY_MODELS, tiny_batch

import lorakit
from lorakit.adapters import DoRA
from lorakit.adapters.multi import adapter_names, adapter_rows, add_adapter, delete_adapter, row_plan, set_adapter
from lorakit.errors import AdapterError


@pytest.fixture(params=sorted(TINY_MODELS))
def arch(request):
    return request.param


def _alone(build, folder, ids):
    model = build() if folder is None else lorakit.load_adapter(build(), folder)
    with torch.no_grad():
        return model(ids).logits


def test_row_plan_groups_rows():
    plan = row_plan(["a", None, "b", "a"])
    assert [(n, r.tolist()) for n, r in plan] == [("a", [0, 3]), ("b", [2])]
    assert row_plan(["a", "a"]) == [("a", None)]
    assert row_plan([None, None]) == []


def test_mixed_batch_logits_equal_each_adapter_alone(arch, tmp_path, one_thread):
    build = TINY_MODELS[arch]
    folders = {name: random_adapter(build, tmp_path / name, seed) for seed, name in enumerate(["a", "b"])}
    folders["d"] = random_adapter(build, tmp_path / "d", 7, r=2, targets=_some_targets(arch), method=DoRA)
    model = build()
    for name, folder in folders.items():
        add_adapter(model, name, folder)
    rows = ["a", None, "b", "a", "d", "d"]
    ids = tiny_batch(batch=6, length=6)
    with torch.no_grad(), adapter_rows(model, rows):
        mixed = model(ids).logits
    for row, name in enumerate(rows):
        alone = _alone(build, folders.get(name), ids[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], alone, **tol(reduction=TINY))
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters really change the output
    for name in ("b", "d"):  # whole-batch choice
        set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids[:2]).logits, _alone(build, folders[name], ids[:2]),
                                       **tol(reduction=TINY))
    set_adapter(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, _alone(build, None, ids[:1]), **tol(reduction=TINY))


def _some_targets(arch: str) -> list[str]:
    """A DoRA adapter on fewer modules (and another rank) than the LoRA ones: stacking pads both."""
    return {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bloom": ["query_key_value"]}[arch]


def test_mixed_batch_greedy_generations_equal_alone(arch, tmp_path, one_thread):
    build = TINY_MODELS[arch]
    folders = {name: random_adapter(build, tmp_path / name, seed) for seed, name in enumerate(["a", "b"])}
    folders["d"] = random_adapter(build, tmp_path / "d", 7, targets=_some_targets(arch), method=DoRA)
    model = build()
    for name, folder in folders.items():
        add_adapter(model, name, folder)
    prompts = [[5, 9, 11], [7, 3], [4, 4, 8, 20, 6], [30], [8, 9]]
    rows = ["b", "a", None, "b", "d"]
    budgets = [8, 3, 6, 1, 5]  # rows finish at different steps and leave the batch (cache and adapter rows)
    check_rows_decode_alone(model, rows, lambda name: build() if name is None else
                            lorakit.load_adapter(build(), folders[name]), prompts, budgets)


def test_named_adapter_errors(tmp_path):
    build = TINY_MODELS["llama"]
    folder = random_adapter(build, tmp_path / "a", 0)
    model = build()
    add_adapter(model, "a", folder)
    with pytest.raises(AdapterError, match="already loaded"):
        add_adapter(model, "a", folder)
    with pytest.raises(AdapterError, match="no adapter named 'zz' is loaded; loaded adapters: a"):
        set_adapter(model, "zz")
    delete_adapter(model, "a")
    assert adapter_names(model) == []
    assert not any(m._forward_hooks for m in model.modules())  # no hooks left behind
    with pytest.raises(AdapterError, match="already carries an adapter"):
        add_adapter(lorakit.load_adapter(build(), folder), "a", folder)


def test_benchmark_agrees_with_peft_set_adapter_loop(tmp_path, monkeypatch, one_thread):
    """benchmarks/multi_adapter.py, tiny: the per-row batch and peft's adapter loop give the same text."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "multi_adapter.py"
    spec = importlib.util.spec_from_file_location("multi_adapter_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["multi_adapter.py", "--adapters", "3", "--prompts", "6", "--max-new-tokens",
                                      "4", "--repeats", "1", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["same_text"] == "6/6"  # every prompt: the same text from both pipelines
