"""The one label value that means "no loss at this position" (PyTorch cross-entropy's default ignore_index)."""
from __future__ import annotations

IGNORE_INDEX = -100
