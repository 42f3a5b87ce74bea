"""lorakit inspect: spectral pure functions on constructed matrices, and the command on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from lorakit.adapters import LoRA, apply, save_adapter
from lorakit.analysis.spectral import compare_matrices, effective_rank, intruder_dimensions
from lorakit.cli import main


def _unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def _base(seed: int = 0) -> torch.Tensor:
    return torch.randn(96, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / 8


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([5.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    assert 1.0 < effective_rank(torch.tensor([4.0, 1.0])) < 2.0


def test_a_planted_intruder_direction_is_found():
    base = _base()
    u, v = _unit(96, 1), _unit(64, 2)
    tuned = base + 6.0 * torch.outer(u, v)  # a new direction, far stronger than the base's singular values
    intruders = intruder_dimensions(base, tuned, top_k=10, threshold=0.5)
    assert [i.index for i in intruders] == [0]
    assert intruders[0].singular_value > 5.0 and intruders[0].max_cosine < 0.5


def test_a_small_perturbation_or_an_aligned_update_gives_none():
    base = _base()
    noise = torch.randn(96, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert intruder_dimensions(base, base + 1e-3 * noise) == []
    u, s, vh = torch.linalg.svd(base, full_matrices=False)
    assert intruder_dimensions(base, base + 2.0 * torch.outer(u[:, 5], vh[5])) == []  # grows an existing direction


def test_compare_matrices_sees_a_rank_r_update():
    base = _base()
    a = torch.randn(4, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    b = torch.randn(96, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    spectrum = compare_matrices("w", base, base + 0.1 * b @ a)
    assert sum(s > 1e-9 for s in spectrum.delta_singular_values) == 4
    assert 1.0 < spectrum.effective_rank <= 4.0
    assert spectrum.relative_change == pytest.approx(float((0.1 * b @ a).norm() / base.norm()))


@pytest.fixture
def base_folder(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    return path


def test_inspect_cli_on_an_adapter(base_folder, tmp_path, capsys):
    model = apply(tiny_llama(), LoRA(r=2, alpha=4, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(6)) * 3.0)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_folder))
    report = tmp_path / "spectra.json"
    assert main(["inspect", str(tmp_path / "adapter"), "--json", str(report), "--png", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and (tmp_path / "s.png").stat().st_size > 0
    modules = {m["name"]: m for m in json.loads(report.read_text())}
    assert len(modules) == 14  # every linear layer of the 2-layer model
    changed = [name for name, m in modules.items() if m["relative_change"] > 0]
    assert sorted(changed) == sorted(f"model.layers.{i}.{p}.weight" for i in range(2)
                                     for p in ("self_attn.q_proj", "mlp.down_proj"))
    assert all(m["effective_rank"] <= 2.0 + 1e-6 for m in modules.values())


def test_inspect_cli_on_a_full_model_needs_a_base(base_folder, tmp_path, capsys):
    tuned = tiny_llama()
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    assert main(["inspect", str(tmp_path / "tuned")]) == 2
    assert "pass --base" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "tuned"), "--base", str(base_folder)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model.layers")]
    changed = [line.split()[0] for line in lines if float(line.split()[2]) > 0]
    assert changed == ["model.layers.1.mlp.up_proj"]
    assert (tmp_path / "tuned" / "spectra.png").is_file()
