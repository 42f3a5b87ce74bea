"""docs/lab.md's verdicts: computed from the runs by the stated rules, never typed in."""
from __future__ import annotations

from lorakit.lab.claims import forgetting_section, lr_section, targets_section
from lorakit.cli import main


def _row(method, lr, train, held_out, r=16, targets="all-linear", general=1.0, accuracy=0.9):
    return {"name": f"{method}-{targets}-{lr}", "method": method, "lr": lr, "r": r if method != "full" else None,
            "targets": targets if method != "full" else None, "final_train_loss": train, "eval_loss": held_out,
            "general_loss": general, "accuracy": accuracy, "trainable_params": 100}


def _lr_rows(lora_best: float, full_best: float) -> list[dict]:
    rows = []
    for lr in (1e-5, 1e-4, 1e-3, 1e-2):
        rows.append(_row("lora", lr, 0.1 if lr == lora_best else 1.0, 0.2 if lr == lora_best else 1.0))
        rows.append(_row("full", lr, 0.1 if lr == full_best else 1.0, 0.2 if lr == full_best else 1.0))
    return rows


def test_lr_claim_verdict_follows_the_ratio_of_best_learning_rates():
    assert "**Reproduced.**" in lr_section(_lr_rows(1e-3, 1e-4))
    assert "ratio 10.0x" in lr_section(_lr_rows(1e-3, 1e-4))
    assert "**Not reproduced.**" in lr_section(_lr_rows(1e-4, 1e-4))


def test_targets_verdict():
    rows = [_row("lora", 1e-3, 0.5, 0.6, targets="attention"), _row("lora", 1e-3, 0.1, 0.2, targets="mlp"),
            _row("lora", 1e-3, 0.1, 0.2)]
    assert "**Reproduced.**" in targets_section(rows)
    rows[0].update(final_train_loss=0.05, eval_loss=0.1)
    assert "**Partly reproduced.**" in targets_section(rows)


def test_forgetting_verdict_compares_at_matched_accuracy():
    base = {"general_loss": 0.6}
    lora = [_row("lora", 1e-3, 0.1, 0.3, general=0.7, accuracy=0.95)]
    full = [_row("full", 1e-4, 0.1, 0.2, general=0.9, accuracy=0.95)]
    assert "**Reproduced.**" in forgetting_section(base, lora + full)  # learns less, forgets less
    full[0]["general_loss"] = 0.65
    assert "**Partly reproduced.**" in forgetting_section(base, lora + full)


def test_lab_report_is_a_command(capsys):
    assert main(["lab-report", "--help"]) == 0
    assert "--work" in capsys.readouterr().out
