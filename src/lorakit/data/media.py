"""A row's non-text items: found in its column, decoded (images with Pillow), checked against its placeholders.

A row with images keeps its text in any row format and marks each image's place with `<image>` (lorakit/media.py:
the modality's placeholder); a chat row may instead give a message's content as parts, `{"type": "image"}` beside
`{"type": "text", "text": ...}` (TRL's and LLaMA-Factory's convention: data/chat.py renders such a part as the
placeholder). The images themselves, in placeholder order, are in the column `images` (or `image`): one item or
a list, each

    a path                  relative paths are read from data.media_dir, else the folder of the data source
    bytes                   the encoded file (PNG, JPEG, ...)
    {"bytes": ..., "path": ...}   Hugging Face datasets' Image column (bytes first, else the path)
    a data URL              data:image/png;base64,...  (what `lorakit serve` receives)
    a PIL image, or an (H, W, 3) uint8 array   (rows and prompts made in memory)

Each is decoded to RGB and resized to the method's slot shape (3, H, W), uint8. Every problem is a RowError that
names the field and item (a missing file, an undecodable image, a count of placeholders that differs from the
count of items), which tokenization prefixes with the row's place.
"""
from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image  # a dependency of matplotlib, so always installed with lorakit

from lorakit.data.rows import Rendered, RowError
from lorakit.media import MediaSlot, columns, placeholder

Decoder = Callable[[Any, MediaSlot, Path, str], np.ndarray]  # (source, slot, folder, where) -> (*shape) uint8


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def row_items(row: dict[str, Any], modality: str) -> tuple[str, list[Any]]:
    """(the column read, the row's items of `modality`): `images`, else `image`; none when neither holds any."""
    for column in columns(modality):
        value = row.get(column)
        if value is not None:
            return column, list(value) if isinstance(value, (list, tuple)) else [value]
    return columns(modality)[0], []


def attach_media(rendered: Rendered, row: dict[str, Any], slots: dict[str, MediaSlot], folder: Path) -> Rendered:
    """`rendered` with each modality's items decoded, in placeholder order; a RowError when the counts differ."""
    text = "".join(segment for segment, _ in rendered.segments)
    for modality, slot in slots.items():
        column, items = row_items(row, modality)
        marks = text.count(placeholder(modality))
        if marks != len(items):
            raise RowError(f"the text has {_plural(marks, placeholder(modality) + ' placeholder')} but field "
                           f"{column!r} holds {_plural(len(items), modality)}")
        rendered.media[modality] = [decode_item(source, slot, folder, f"field {column!r}[{index}]")
                                    for index, source in enumerate(items)]
    return rendered


def decode_item(source: Any, slot: MediaSlot, folder: Path, where: str) -> np.ndarray:
    """One item decoded to the slot's shape, uint8; `where` names it in a RowError ("field 'images'[0]")."""
    return DECODERS[slot.kind](source, slot, folder, where)


def _image_bytes(source: Any, folder: Path, where: str) -> tuple[bytes | None, Any, str]:
    """(encoded bytes, or None with an open PIL image, and how to name the source in a message)."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), None, f"{len(source)} bytes"
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise RowError(f"{where}: a data URL must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True), None, "the data URL"
        except (binascii.Error, ValueError) as error:
            raise RowError(f"{where}: the data URL's base64 does not decode ({error})") from None
    if isinstance(source, (str, Path)) and str(source):
        path = Path(source).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise RowError(f"{where}: file {str(source)!r} not found (read from {path.parent})")
        return path.read_bytes(), None, repr(str(source))
    if isinstance(source, Image.Image):
        return None, source, "the image"
    if isinstance(source, np.ndarray):  # (H, W, 3) or (H, W) uint8, e.g. an image drawn in memory
        try:
            return None, Image.fromarray(source), f"the {source.dtype} array of shape {source.shape}"
        except (TypeError, ValueError):
            raise RowError(f"{where}: an array image must be (H, W, 3) or (H, W) uint8, got {source.dtype} "
                           f"{source.shape}") from None
    raise RowError(f"{where} must be an image path, bytes, a data URL, a PIL image or an array, got "
                   f"{type(source).__name__}")


def decode_image(source: Any, slot: MediaSlot, folder: Path, where: str) -> np.ndarray:
    """An image source as an RGB (3, H, W) uint8 array at the slot's size (bilinear resize)."""
    data, image, shown = _image_bytes(source, folder, where)
    try:
        if image is None:
            image = Image.open(io.BytesIO(data))
        height, width = slot.shape[1:]
        pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's UnidentifiedImageError is an OSError
        raise RowError(f"{where}: cannot decode {shown} as an image ({type(error).__name__})") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


DECODERS: dict[str, Decoder] = {"image": decode_image}
