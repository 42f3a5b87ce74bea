"""Figures as PNG files (or inline SVG for HTML pages), with no display and no pyplot state: the one place a figure
is made and saved."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
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


def figure_svg(figure: Any) -> str:
    """`figure` as an <svg> element to inline in an HTML page: text stays text (tick labels are selectable and
    searchable), no XML prolog, no metadata, nothing to fetch."""
    figure.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "lorakit"}):  # fixed ids: same page twice
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]
