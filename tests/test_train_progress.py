"""Progress display: a live bar on terminals, plain lines elsewhere, nothing when asked."""
from __future__ import annotations

import io

from lorakit.train.progress import BarProgress, PlainProgress, make_progress
from train_fixtures import run_tiny


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_redraws_one_line_with_step_loss_speed_and_eta():
    stream = FakeTerminal()
    progress = make_progress("auto", total_steps=10, stream=stream)
    assert isinstance(progress, BarProgress)
    for step in range(1, 4):
        progress.advance(step)
    progress.report(3, loss=2.5, tokens_per_s=12345.0, lr=1e-3)
    progress.message("step 3: eval loss 2.6000")
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 2  # only the message and the closing newline break the line
    last_draw = text.rstrip("\n").split("\r")[-1]
    assert "[#######-----------------] step 3/10" in last_draw
    assert "loss 2.5000" in last_draw and "12,345 tok/s" in last_draw and "eta 0:0" in last_draw
    assert "\rstep 3: eval loss 2.6000\033[K\n" in text


def test_plain_lines_when_not_a_terminal_and_silence_for_none():
    stream = io.StringIO()
    progress = make_progress("auto", total_steps=4, stream=stream)
    assert isinstance(progress, PlainProgress)
    progress.advance(1)
    progress.report(2, loss=1.25, tokens_per_s=100.0, lr=5e-4)
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().startswith("[lorakit] step 2/4 | loss 1.2500 | lr 5.00e-04 | 100 tok/s | eta ")

    quiet = io.StringIO()
    silent = make_progress("none", total_steps=4, stream=quiet)
    silent.report(1, loss=1.0, tokens_per_s=1.0, lr=1.0)
    silent.message("hello")
    silent.close()
    assert quiet.getvalue() == ""


def test_eta_uses_this_process_pace_after_a_resume():
    progress = make_progress("none", total_steps=100, start_step=90)
    assert progress.eta_seconds() is None
    progress.started -= 10.0  # ten seconds for five steps
    progress.advance(95)
    assert 9.0 < progress.eta_seconds() < 11.0


def test_the_loop_writes_one_plain_line_per_logged_step(tmp_path, capsys):
    run_tiny(tmp_path, epochs=1, log_every=2, progress="plain")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[lorakit] step")]
    assert [line.split(" | ")[0] for line in lines] == ["[lorakit] step 2/4", "[lorakit] step 4/4"]
