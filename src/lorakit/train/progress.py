"""Progress display: a live one-line bar on a terminal, plain log lines elsewhere.

The loop calls `advance(step)` every optimizer step (no device sync: it only counts) and
`report(...)` at logging steps, when the loss has been read from the device anyway.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

logger = logging.getLogger("lorakit.train")


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS or M:SS."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Silent base: counts steps and estimates the time left; subclasses decide what to show."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.step = start_step
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.last: dict[str, float] = {}

    def eta_seconds(self) -> float | None:
        """Seconds left at this process's pace so far (None before the first step)."""
        done = self.step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total_steps - self.step)

    def advance(self, step: int) -> None:
        """Note that optimizer step `step` (1-based) finished."""
        self.step = step

    def report(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        """Show the numbers of a logging step."""
        self.step = step
        self.last = {"loss": loss, "tokens_per_s": tokens_per_s, "lr": lr}

    def message(self, text: str) -> None:
        """A one-off event (eval loss, checkpoint, batch halving); silent mode sends it to logging."""
        logger.info(text)

    def close(self) -> None:
        """Finish the display."""

    def _status(self) -> str:
        eta = self.eta_seconds()
        parts = [f"step {self.step}/{self.total_steps}"]
        if self.last:
            parts += [f"loss {self.last['loss']:.4f}", f"lr {self.last['lr']:.2e}",
                      f"{self.last['tokens_per_s']:,.0f} tok/s"]
        parts.append(f"eta {_clock(eta)}" if eta is not None else "eta ?")
        return " | ".join(parts)


class PlainProgress(Progress):
    """One log line per logging step, for files, pipes and CI logs."""

    def report(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        super().report(step, loss, tokens_per_s, lr)
        self.stream.write(f"[lorakit] {self._status()}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(f"[lorakit] {text}\n")
        self.stream.flush()


class BarProgress(Progress):
    """A live bar redrawn in place with carriage returns."""

    width = 24

    def _draw(self) -> None:
        filled = int(self.width * self.step / max(1, self.total_steps))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self._status()}\033[K")
        self.stream.flush()

    def advance(self, step: int) -> None:
        super().advance(step)
        self._draw()

    def report(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        super().report(step, loss, tokens_per_s, lr)
        self._draw()

    def message(self, text: str) -> None:
        self.stream.write(f"\r{text}\033[K\n")
        self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _auto(total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> Progress:
    stream = stream if stream is not None else sys.stderr
    kind = BarProgress if getattr(stream, "isatty", lambda: False)() else PlainProgress
    return kind(total_steps, start_step, stream)


PROGRESS_MODES: dict[str, Callable[..., Progress]] = {
    "auto": _auto,
    "bar": BarProgress,
    "plain": PlainProgress,
    "none": Progress,
}


def make_progress(mode: str, total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> Progress:
    """The progress display for `mode` (one of PROGRESS_MODES)."""
    return PROGRESS_MODES[mode](total_steps, start_step, stream)
