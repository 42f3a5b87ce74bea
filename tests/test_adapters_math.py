"""Pure LoRA math: scaling, delta weights, merge / unmerge, parameter counts, initialisation."""
import math

import pytest
import torch
from _tol import tol
from conftest import tiny_llama

import lorakit
from lorakit.adapters.lora_math import (delta_weight, init_lora_A_, init_lora_B_, lora_branch, lora_param_count,
                                        merge_weight, scaling, unmerge_weight)


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert scaling(16, 8) == 2.0
    assert scaling(16, 4, rslora=True) == 8.0
    assert scaling(8, 16, rslora=True) == pytest.approx(2.0)


def test_exercise_1_a_10000_by_10000_matrix_with_rank_8():
    lora = lora_param_count(10_000, 10_000, 8)
    assert lora == 160_000
    assert 10_000 * 10_000 / lora == 625


def test_delta_weight_is_scaled_B_times_A_in_the_base_layout():
    torch.manual_seed(0)
    A, B = torch.randn(3, 5), torch.randn(7, 3)  # r=3, d_in=5, d_out=7
    expected = torch.einsum("or,ri->oi", B, A) * 0.5
    torch.testing.assert_close(delta_weight(A, B, 0.5), expected, **tol(reduction=3))
    assert delta_weight(A, B, 0.5, fan_in_fan_out=True).shape == (5, 7)
    torch.testing.assert_close(delta_weight(A, B, 0.5, fan_in_fan_out=True), expected.T, **tol(reduction=3))


def test_branch_equals_the_merged_weight_acting_on_the_input():
    torch.manual_seed(1)
    W, A, B, x = torch.randn(7, 5), torch.randn(3, 5), torch.randn(7, 3), torch.randn(4, 2, 5)
    merged = merge_weight(W, A, B, 2.0)
    torch.testing.assert_close(x @ W.T + lora_branch(x, A, B, 2.0), x @ merged.T, **tol(reduction=5))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_unmerge_inverts_merge(fan_in_fan_out):
    torch.manual_seed(2)
    A, B = torch.randn(4, 6), torch.randn(9, 4)
    W = torch.randn(6, 9) if fan_in_fan_out else torch.randn(9, 6)
    merged = merge_weight(W, A, B, 1.5, fan_in_fan_out)
    assert not torch.allclose(merged, W)
    size = float(merged.abs().max())  # W + dW - dW: two roundings at the merged weight's size
    torch.testing.assert_close(unmerge_weight(merged, A, B, 1.5, fan_in_fan_out), W, **tol(reduction=4, scale=size))


def test_kaiming_init_stays_inside_one_over_sqrt_fan_in():
    A = init_lora_A_(torch.empty(16, 400))
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3), bound sqrt(3) * gain / sqrt(fan_in)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_gaussian_init_has_std_one_over_r_and_B_starts_at_zero():
    A = init_lora_A_(torch.empty(4, 20_000), "gaussian")
    assert A.std().item() == pytest.approx(0.25, rel=0.02)
    assert torch.count_nonzero(init_lora_B_(torch.ones(8, 4))) == 0
    with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
        init_lora_A_(torch.empty(2, 2), "xavier")


@pytest.mark.parametrize("init, peft_init", [("kaiming", True), ("gaussian", "gaussian")])
def test_init_draws_the_same_A_as_peft_for_the_same_seed(init, peft_init):
    from peft import LoraConfig, get_peft_model

    ours_model, peft_model = tiny_llama(), tiny_llama()
    torch.manual_seed(123)
    lorakit.apply(ours_model, lorakit.LoRA(r=4, targets=["q_proj", "down_proj"], init=init))
    torch.manual_seed(123)
    peft_model = get_peft_model(peft_model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                       init_lora_weights=peft_init))
    peft_A = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if "lora_A" in n}
    ours_A = {n: p for n, p in ours_model.named_parameters() if "lora_A" in n}
    assert sorted(peft_A) == sorted(ours_A) and len(ours_A) == 4
    for name, param in ours_A.items():
        assert torch.equal(param, peft_A[name]), name
    assert all(torch.count_nonzero(p) == 0 for n, p in ours_model.named_parameters() if "lora_B" in n)
