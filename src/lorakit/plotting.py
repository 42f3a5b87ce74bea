"""Figures as PNG files, with no display and no pyplot state: the one place a figure is made and saved."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1) -> tuple[Any, list]:
    """(figure, its `ncols` axes side by side) on an Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def save_figure(figure: Any, path: Path) -> Path:
    """Lay out and write `figure` to `path` (PNG by suffix); returns the path."""
    figure.tight_layout()
    figure.savefig(path)
    return path
