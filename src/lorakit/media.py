"""What data and the modality adapter agree on about non-text inputs (images): the ground both rooms stand on.

A modality has a name (`image`, or any name a method config gives it) and a kind (how an item is decoded
and encoded; `image` is the one kind so far). In rows, text marks where an item goes with the modality's
placeholder (`<image>`) and the row lists its items in the column `images` (or `image`). A method that reads
a modality reserves `MediaSlot.tokens` positions for each item (its soft tokens) and says what one decoded
item looks like (`shape`). Batches carry, per modality,

    {name}_values      (B, K, *shape) uint8    the row's K items (zeros where a row has fewer)
    {name}_positions   (B, K) long             where each item's soft tokens start in the row; -1: no item

and the modality adapter's forward pre-hook takes both out of the model's inputs. An item of a prompt being
decoded is a `MediaItem`: (modality, start, values), `start` counted from the prompt's first token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("image",)  # the kinds of item lorakit decodes and encodes

MediaItem = tuple[str, int, Any]  # (modality, first soft-token position, the decoded item (*shape) uint8)


@dataclass(frozen=True)
class MediaSlot:
    """What a method reserves for each item of one modality."""

    tokens: int  # soft tokens in place of each placeholder
    shape: tuple[int, ...]  # one decoded item: (3, H, W) for an image
    kind: str = "image"  # how the item is decoded (data/media.py) and encoded (adapters/modality.py)


def placeholder(modality: str) -> str:
    """The text that marks where an item of `modality` goes: '<image>'."""
    return f"<{modality}>"


def columns(modality: str) -> tuple[str, str]:
    """The row columns that list a modality's items, in the order they are looked for: ('images', 'image')."""
    return f"{modality}s", modality


def values_key(modality: str) -> str:
    """The batch key of a modality's decoded items."""
    return f"{modality}_values"


def positions_key(modality: str) -> str:
    """The batch key of where a modality's items start in each row."""
    return f"{modality}_positions"
