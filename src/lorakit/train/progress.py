"""Progress display: a live one-line bar on a terminal or in a notebook, plain log lines elsewhere.

In a Jupyter notebook (an IPython kernel, whose streams are not terminals) 'auto' draws a bar
that redraws in place: tqdm's (a widget with ipywidgets, text otherwise), or a carriage-return
bar without tqdm; never one output line per update.

The loop calls `advance(step)` every optimizer step (no device sync: it only counts) and
`report(...)` at logging steps, when the loss has been read from the device anyway.
"""
from __future__ import annotations

import importlib.util
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
        self.extra = ""  # more numbers of the last logging step, e.g. a preference run's reward accuracy

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
            parts += [f"loss {self.last['loss']:.4f}", *([self.extra] if self.extra else []),
                      f"lr {self.last['lr']:.2e}", f"{self.last['tokens_per_s']:,.0f} tok/s"]
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

    def _line(self, text: str) -> str:
        """`text` redrawn over the current line (ANSI erase-to-end clears a longer earlier draw)."""
        return f"\r{text}\033[K"

    def _draw(self) -> None:
        filled = int(self.width * self.step / max(1, self.total_steps))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(self._line(f"[{bar}] {self._status()}"))
        self.stream.flush()

    def advance(self, step: int) -> None:
        super().advance(step)
        self._draw()

    def report(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        super().report(step, loss, tokens_per_s, lr)
        self._draw()

    def message(self, text: str) -> None:
        self.stream.write(self._line(text) + "\n")
        self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class CarriageReturnBar(BarProgress):
    """The bar for a notebook without tqdm: a notebook's output honours a carriage return but not
    every ANSI code, so a shorter draw is padded with spaces over the longer one before it."""

    drawn = 0  # length of the longest line drawn so far

    def _line(self, text: str) -> str:
        self.drawn = max(self.drawn, len(text))
        return "\r" + text.ljust(self.drawn)


class TqdmProgress(Progress):
    """A tqdm bar (`tqdm.auto`: an ipywidgets bar in a notebook that has ipywidgets, else tqdm's
    text bar redrawn with carriage returns); the last logged loss, lr and speed as its postfix."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> None:
        from tqdm.auto import tqdm  # transformers depends on tqdm; without it `notebook_progress` falls back

        super().__init__(total_steps, start_step, stream)
        self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True)

    def _to(self, step: int) -> None:
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def advance(self, step: int) -> None:
        super().advance(step)
        self._to(step)

    def report(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        super().report(step, loss, tokens_per_s, lr)
        extra = f" | {self.extra}" if self.extra else ""
        self.bar.set_postfix_str(f"loss {loss:.4f}{extra} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s", refresh=False)
        self._to(step)
        self.bar.refresh()

    def message(self, text: str) -> None:
        self.bar.write(text, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def in_notebook() -> bool:
    """True inside a Jupyter kernel (notebook, JupyterLab, VS Code, Colab): ipykernel is loaded and
    IPython's running shell is a kernel's."""
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return getattr(shell, "kernel", None) is not None


def notebook_progress(total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> Progress:
    """A bar that redraws in place in a notebook: tqdm's when tqdm is installed, else a carriage-return bar."""
    if importlib.util.find_spec("tqdm") is None:
        return CarriageReturnBar(total_steps, start_step, stream)
    return TqdmProgress(total_steps, start_step, stream)


def _auto(total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> Progress:
    """A bar on a terminal or in a notebook, plain lines in files, pipes and CI logs."""
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return BarProgress(total_steps, start_step, stream)
    if in_notebook():
        return notebook_progress(total_steps, start_step, stream)
    return PlainProgress(total_steps, start_step, stream)


PROGRESS_MODES: dict[str, Callable[..., Progress]] = {
    "auto": _auto,
    "bar": BarProgress,
    "plain": PlainProgress,
    "none": Progress,
}


def make_progress(mode: str, total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> Progress:
    """The progress display for `mode` (one of PROGRESS_MODES)."""
    return PROGRESS_MODES[mode](total_steps, start_step, stream)
