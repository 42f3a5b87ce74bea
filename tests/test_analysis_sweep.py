"""lorakit sweep: the grid, target sets per architecture, a resumable CLI run with its outputs."""
from __future__ import annotations

import csv
import json

import pytest
from conftest import tiny_bloom, tiny_gpt2, tiny_llama

from lorakit.analysis.sweep import CELL_FILE, Cell, final_train_loss, grid
from lorakit.analysis.targets import resolve_target_set
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.lab.datasets import read_jsonl
from lorakit.models import EMBEDDED_DATASETS


def test_grid_gives_full_one_cell_per_lr():
    cells = grid(["lora", "full"], [4, 16], [1e-4, 1e-3], ["all-linear", "mlp"])
    assert len(cells) == 2 * 2 * 2 + 2
    assert Cell("full", 1e-4) in cells and Cell("lora", 1e-3, 16, "mlp") in cells
    assert len({c.name for c in cells}) == len(cells)
    assert Cell("lora", 1e-3, 16, "attention").name == "lora-r16-attention-lr1e-03"


def test_grid_rejects_an_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'lorra'"):
        grid(["lorra"], [4], [1e-3], ["all-linear"])


@pytest.mark.parametrize("build,attention,mlp", [
    (tiny_llama, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
     ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    (tiny_gpt2, ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    (tiny_bloom, ["self_attention.query_key_value", "self_attention.dense"],
     ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
])
def test_target_sets_split_attention_from_mlp(build, attention, mlp):
    model = build()
    assert resolve_target_set("attention", model) == attention
    assert resolve_target_set("mlp", model) == mlp
    assert resolve_target_set("all-linear", model) == "all-linear"
    with pytest.raises(ConfigError, match="unknown target set 'heads'"):
        resolve_target_set("heads", model)


def test_final_train_loss_averages_the_last_tenth():
    records = [{"step": s, "loss": float(s)} for s in range(1, 21)] + [{"step": 21, "eval_loss": 0.1}]
    assert final_train_loss(records) == pytest.approx((19 + 20) / 2)
    assert final_train_loss([]) is None


@pytest.mark.timeout(300)
def test_sweep_cli_runs_a_2x2_grid_and_resumes(tmp_path, capsys, one_thread):
    out, general = tmp_path / "sweep", tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps(row) + "\n" for row in read_jsonl(EMBEDDED_DATASETS["embedded-general"])[:16]))
    args = ["sweep", "data.limit=64", "data.val_limit=16", "train.micro_batch_size=8", "--ranks", "2,4", "--lrs", "1e-3,3e-3", "--out", str(out), "--general-data", str(general),
            "--train.max_steps", "3", "--train.eval_every", "0", "--train.log_every", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    names = ["lora-r2-all-linear-lr1e-03", "lora-r2-all-linear-lr3e-03", "lora-r4-all-linear-lr1e-03",
             "lora-r4-all-linear-lr3e-03"]
    assert all(f"done {name}" in first for name in names)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["name"] for row in rows] == names
    assert all(float(row["general_loss"]) > 0 and row["steps"] == "3" for row in rows)
    assert {row["trainable_params"] for row in rows if row["r"] == "4"} != {row["trainable_params"] for row in rows
                                                                             if row["r"] == "2"}
    for figure in ("rank_curves.png", "lr_sweep.png", "forgetting.png", "results.md"):
        assert (out / figure).stat().st_size > 0
    stamps = {name: (out / name / CELL_FILE).stat().st_mtime_ns for name in names}
    (out / names[3] / CELL_FILE).unlink()  # as if killed before the cell finished
    assert main(args) == 0
    second = capsys.readouterr().out
    assert all(f"skip {name}: already complete" in second for name in names[:3])
    assert f"restart {names[3]}" in second and f"done {names[3]}" in second
    assert {name: (out / name / CELL_FILE).stat().st_mtime_ns for name in names[:3]} == \
        {name: stamps[name] for name in names[:3]}
    assert json.loads((out / names[3] / CELL_FILE).read_text())["steps"] == 3
