"""Procedural flags of the embedded world: the images behind the multimodal lab.

Every country here has a flag made of simple geometry (stripes, a Nordic cross, a disc, a plus),
so it can be drawn from a few numbers, offline, with numpy. A rendering puts the flag at a random
size and position on a noisy background, jitters its colours and adds pixel noise, so the model
has to recognise the *pattern*, not memorise pixels. Held-out renderings use seeds the training
renderings never use.

The flags are simplified (no coats of arms, the proportions are approximate): what matters is
that two countries never share a drawing, e.g. Poland (white over red) and Indonesia (red over
white) differ only in order, as do Mali and Guinea.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lorakit.lab.facts import Country, country

# Colours as RGB, one name per shade used.
_C = {
    "red": (206, 17, 38), "white": (250, 250, 250), "blue": (0, 56, 168), "green": (0, 135, 81),
    "yellow": (252, 209, 22), "black": (16, 16, 16), "orange": (255, 130, 0), "gold": (255, 206, 0),
    "maroon": (158, 48, 57), "lightblue": (85, 170, 230), "navy": (0, 38, 100), "darkgreen": (0, 106, 78),
}


@dataclass(frozen=True)
class Flag:
    """A flag drawn from one pattern: `kind` and its colours (and, for some kinds, weights)."""

    kind: str                        # "h" stripes, "v" stripes, "nordic", "disc", "plus"
    colours: tuple[str, ...]
    weights: tuple[float, ...] = ()  # stripe heights (h/v); empty = equal
    aspect: float = 1.5              # width / height


# country name (as in the fact table) -> flag
FLAGS: dict[str, Flag] = {
    # vertical tricolours
    "France": Flag("v", ("blue", "white", "red")),
    "Italy": Flag("v", ("green", "white", "red")),
    "Ireland": Flag("v", ("green", "white", "orange"), aspect=2.0),
    "Belgium": Flag("v", ("black", "yellow", "red"), aspect=1.15),
    "Romania": Flag("v", ("blue", "yellow", "red")),
    "Mali": Flag("v", ("green", "yellow", "red")),
    "Guinea": Flag("v", ("red", "yellow", "green")),
    "Nigeria": Flag("v", ("green", "white", "green"), aspect=2.0),
    "Peru": Flag("v", ("red", "white", "red")),
    # horizontal stripes
    "Germany": Flag("h", ("black", "red", "gold"), aspect=5 / 3),
    "the Netherlands": Flag("h", ("red", "white", "blue")),
    "Russia": Flag("h", ("white", "blue", "red")),
    "Austria": Flag("h", ("red", "white", "red")),
    "Hungary": Flag("h", ("red", "white", "green"), aspect=2.0),
    "Bulgaria": Flag("h", ("white", "green", "red"), aspect=5 / 3),
    "Estonia": Flag("h", ("blue", "black", "white"), aspect=11 / 7),
    "Lithuania": Flag("h", ("yellow", "green", "red"), aspect=5 / 3),
    "Latvia": Flag("h", ("maroon", "white", "maroon"), (2, 1, 2), aspect=2.0),
    "Ukraine": Flag("h", ("blue", "yellow")),
    "Poland": Flag("h", ("white", "red"), aspect=1.6),
    "Indonesia": Flag("h", ("red", "white")),
    "Yemen": Flag("h", ("red", "white", "black")),
    "Sierra Leone": Flag("h", ("green", "white", "blue")),
    "Gabon": Flag("h", ("green", "yellow", "blue"), aspect=4 / 3),
    "Armenia": Flag("h", ("red", "blue", "orange"), aspect=2.0),
    "Colombia": Flag("h", ("yellow", "blue", "red"), (2, 1, 1)),
    "Mauritius": Flag("h", ("red", "blue", "yellow", "green")),
    "Thailand": Flag("h", ("red", "white", "navy", "white", "red"), (1, 1, 2, 1, 1)),
    "Botswana": Flag("h", ("lightblue", "white", "black", "white", "lightblue"), (9, 1, 4, 1, 9)),
    # Nordic crosses: background, cross (, inner cross)
    "Sweden": Flag("nordic", ("blue", "yellow"), aspect=1.6),
    "Denmark": Flag("nordic", ("red", "white"), aspect=37 / 28),
    "Finland": Flag("nordic", ("white", "blue"), aspect=18 / 11),
    "Norway": Flag("nordic", ("red", "white", "blue"), aspect=22 / 16),
    "Iceland": Flag("nordic", ("blue", "white", "red"), aspect=25 / 18),
    # discs: background, disc; weights = (centre x as a fraction of the width,)
    "Japan": Flag("disc", ("white", "red"), (0.5,)),
    "Bangladesh": Flag("disc", ("darkgreen", "red"), (0.45,), aspect=5 / 3),
    "Palau": Flag("disc", ("lightblue", "yellow"), (0.45,), aspect=8 / 5),
    # a plus on a square
    "Switzerland": Flag("plus", ("red", "white"), aspect=1.0),
}


def flag_countries() -> list[Country]:
    """The countries that have a flag here, as fact-table rows (sorted by name)."""
    return sorted((country(name) for name in FLAGS), key=lambda row: row.name)


def _bands(size: int, weights: Sequence[float]) -> np.ndarray:
    """For each of `size` pixels, the index of the band it falls in."""
    edges = np.cumsum(np.asarray(weights, dtype=np.float64)) / float(sum(weights))
    centres = (np.arange(size) + 0.5) / size
    return np.searchsorted(edges, centres, side="right").clip(0, len(weights) - 1)


def draw(flag: Flag, height: int, width: int, colours: dict[str, np.ndarray]) -> np.ndarray:
    """The flag as a (height, width, 3) float array, colours looked up in `colours`."""
    rgb = [colours[name] for name in flag.colours]
    out = np.empty((height, width, 3), dtype=np.float64)
    if flag.kind in ("h", "v"):
        weights = flag.weights or (1.0,) * len(rgb)
        size = height if flag.kind == "h" else width
        index = _bands(size, weights)
        stripes = np.stack([rgb[i] for i in index])
        out[:] = stripes[:, None, :] if flag.kind == "h" else stripes[None, :, :]
        return out
    yy, xx = np.mgrid[0:height, 0:width]
    yc, xc = (yy + 0.5) / height, (xx + 0.5) / width
    out[:] = rgb[0]
    if flag.kind == "nordic":  # vertical bar at 3/8 of the width, horizontal bar through the middle
        thick = 0.24 if len(rgb) == 3 else 0.18
        cross = (np.abs(xc - 0.375) * flag.aspect < thick / 2) | (np.abs(yc - 0.5) < thick / 2)
        out[cross] = rgb[1]
        if len(rgb) == 3:
            inner = (np.abs(xc - 0.375) * flag.aspect < thick / 4) | (np.abs(yc - 0.5) < thick / 4)
            out[inner] = rgb[2]
    elif flag.kind == "disc":
        radius = 0.3
        inside = ((xc - flag.weights[0]) * flag.aspect) ** 2 + (yc - 0.5) ** 2 < radius ** 2
        out[inside] = rgb[1]
    elif flag.kind == "plus":
        arm, half = 0.1, 0.31
        horizontal = (np.abs(yc - 0.5) < arm) & (np.abs(xc - 0.5) < half)
        vertical = (np.abs(xc - 0.5) < arm) & (np.abs(yc - 0.5) < half)
        out[horizontal | vertical] = rgb[1]
    else:
        raise ValueError(f"unknown flag kind {flag.kind!r}")
    return out


def render(name: str, seed: int, size: int = 32) -> np.ndarray:
    """One rendering of `name`'s flag: a (size, size, 3) uint8 image.

    Random, from `seed`: the flag's width (55-95% of the canvas), its position, a background of
    grey noise, per-colour jitter of up to +-24 per channel, and Gaussian pixel noise (sd 8).
    """
    flag = FLAGS[name]
    rng = np.random.default_rng(seed)
    jitter = {key: np.clip(np.asarray(value, np.float64) + rng.uniform(-24, 24, 3), 0, 255)
              for key, value in _C.items()}
    width = int(round(size * rng.uniform(0.55, 0.95)))
    height = max(4, min(size, int(round(width / flag.aspect))))
    top = int(rng.integers(0, size - height + 1))
    left = int(rng.integers(0, size - width + 1))
    canvas = rng.uniform(60, 200) + rng.normal(0, 20, (size, size, 1)) * np.ones((1, 1, 3))
    canvas[top:top + height, left:left + width] = draw(flag, height, width, jitter)
    canvas += rng.normal(0, 8, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="RGB").save(path)
    return path


# The questions, in the embedded lab's prompt format; `<image>` marks where the soft tokens go.
IMAGE_PROMPT = "Question: <image>\n{question}\nAnswer:"
FLAG_QUESTION = "Which country's flag is this?"
COMPOSED = {
    "capital": "What is the capital of the country whose flag this is?",
    "continent": "On which continent is the country whose flag this is?",
}


def image_row(image_path: str, name: str, kind: str) -> dict:
    """One prompt/completion row with an image: `kind` is "flag" or a key of COMPOSED."""
    row = country(name)
    question = FLAG_QUESTION if kind == "flag" else COMPOSED[kind]
    answer = row.title if kind == "flag" else getattr(row, kind)
    return {"images": [image_path], "prompt": IMAGE_PROMPT.format(question=question),
            "completion": " " + answer, "kind": kind, "country": row.name}


@dataclass(frozen=True)
class FlagSplit:
    """Which countries get composed questions in training, and which are held out for them."""

    composed_train: tuple[str, ...]
    composed_held_out: tuple[str, ...]


def split_flags(seed: int = 0, held_out_fraction: float = 0.3) -> FlagSplit:
    """Composed questions are trained on ~70% of the flag countries and asked of the other ~30%,
    whose flags the model still learns to name (the flag question covers every country)."""
    names = sorted(FLAGS)
    random.Random(seed).shuffle(names)
    n_held = max(1, round(held_out_fraction * len(names)))
    return FlagSplit(tuple(sorted(names[n_held:])), tuple(sorted(names[:n_held])))


def build_flag_rows(out_dir: Path, *, seed: int = 0, train_renderings: int = 24,
                    eval_renderings: int = 4, size: int = 32) -> dict[str, list[dict]]:
    """Render the images under `out_dir`/images and return the row sets (image paths relative to `out_dir`, where
    the rows' files go, as training reads them):

    - train: the flag question for every country (`train_renderings` each) and the composed
      questions for the composed-train countries;
    - for each of "validation" (chooses learning rates) and "test" (reports), on renderings of their
      own (`eval_renderings` per country): `<split>_flag`, the flag question for every country;
      `<split>_composed`, the composed questions for the held-out countries; `<split>_composed_seen`,
      the composed questions for the composed-train countries.
    Renderings use disjoint seed ranges: training 1.., validation 2*10**6.., test 10**6...
    """
    split = split_flags(seed)
    out_dir = Path(out_dir)
    ranges = {"train": 1, "test": 1_000_000, "validation": 2_000_000}

    def picture(name: str, part: str, index: int) -> str:
        render_seed = ranges[part] + seed * 100_003 + sorted(FLAGS).index(name) * 1_000 + index
        relative = f"images/{name.replace(' ', '_')}-{render_seed}.png"  # rows name images from their file's folder
        if not (out_dir / relative).exists():
            save_png(render(name, render_seed, size), out_dir / relative)
        return relative

    sets: dict[str, list[dict]] = {"train": []}
    for name in sorted(FLAGS):
        for index in range(train_renderings):
            path = picture(name, "train", index)
            sets["train"].append(image_row(path, name, "flag"))
            if name in split.composed_train:
                sets["train"].append(image_row(path, name, list(COMPOSED)[index % len(COMPOSED)]))
    random.Random(seed).shuffle(sets["train"])
    for part in ("validation", "test"):
        flag, composed, seen = [], [], []
        for name in sorted(FLAGS):
            for index in range(eval_renderings):
                path = picture(name, part, index)
                flag.append(image_row(path, name, "flag"))
                target = composed if name in split.composed_held_out else seen
                target.extend(image_row(path, name, kind) for kind in COMPOSED)
        sets.update({f"{part}_flag": flag, f"{part}_composed": composed, f"{part}_composed_seen": seen})
    return sets
