"""Rows -> examples: token ids with an output-only loss mask, truncated to max_length.

An example is {"input_ids": [...], "labels": [...]} with labels ALIGNED to input_ids:
labels[t] == input_ids[t] where token t is trained, IGNORE_INDEX (-100) where it is not.
Shifting for next-token prediction happens later, in `make_batches`.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lorakit.data.config import DataConfig
from lorakit.data.formats import FORMATS, RowFormat, apply_columns, check_kind, detect_format
from lorakit.data.media import attach_media
from lorakit.data.rows import NumberedRows, Rendered, RowError, place_of
from lorakit.errors import DataError
from lorakit.labels import IGNORE_INDEX
from lorakit.media import MediaSlot, placeholder

Example = dict[str, list[int]]  # plus, for a row with images, "media": [(modality, start, (*shape) uint8), ...]
Span = tuple[str, int]  # (modality, first position of an item's soft tokens)


@dataclass
class TokenizeStats:
    """What tokenization did to the rows; report it so nothing is lost silently."""

    n_rows: int = 0  # rows given
    n_examples: int = 0  # examples produced (preference rows: pairs)
    n_skipped_bad_rows: int = 0  # rows that did not fit the format (skip_bad_rows)
    n_truncated: int = 0  # examples shortened to max_length (kept)
    n_answers_cut: int = 0  # of those, examples whose final answer alone was too long and was cut
    n_dropped: int = 0  # examples dropped: too long with truncation 'drop', or untrained
    n_trained_tokens: int = 0  # tokens with a label, over all examples (pairs: both sides)
    n_tokens: int = 0  # tokens over all examples (pairs: both sides, each with the prompt)

    def summary(self) -> str:
        """One line for logs and run reports."""
        return ", ".join(f"{key[2:]}={value}" for key, value in asdict(self).items())


def bos_prefix(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before a text when add_special_tokens=True (BOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def segment_encoder(tokenizer: Any) -> Callable[[str, bool], list[int]]:
    """encode(text, first) -> ids of one segment, without special tokens.

    SentencePiece-style tokenizers (Llama 2, Mistral v0.1) put a dummy prefix space before
    every encoded text, which is right at the start of an example and wrong in its middle.
    For them, a later segment is encoded after a newline anchor whose ids are then removed
    (verified per segment; if the anchor merged with the text, the plain encoding is used).
    Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) need no anchor and get none.
    """
    def plain(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    anchor = plain("\n")

    def anchored(text: str) -> list[int]:
        ids = plain("\n" + text)
        return ids[len(anchor):] if ids[:len(anchor)] == anchor else plain(text)

    needs_anchor = plain("a") != anchored("a")

    def encode_segment(text: str, first: bool) -> list[int]:
        return anchored(text) if needs_anchor and not first else plain(text)

    return encode_segment


def encode(rendered: Rendered, encode_segment: Callable[[str, bool], list[int]], bos: list[int],
           eos_id: int, train_on_prompt: bool) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, answer_start): each segment encoded on its own and concatenated.

    answer_start is where the final trained segment begins; truncation keeps it whole.
    """
    return encode_with_media(rendered, encode_segment, bos, eos_id, train_on_prompt, {})[:3]


@functools.lru_cache(maxsize=32)
def _placeholders(modalities: tuple[str, ...]) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(placeholder(m)) for m in modalities) + ")")


def encode_with_media(rendered: Rendered, encode_segment: Callable[[str, bool], list[int]], bos: list[int],
                      eos_id: int, train_on_prompt: bool, slots: dict[str, MediaSlot]
                      ) -> tuple[list[int], list[int], int, list[Span]]:
    """`encode`, where each placeholder of a modality in `slots` becomes that slot's positions (filled with EOS
    ids, never trained, replaced by soft tokens in the model) instead of text; also returns each item's span."""
    ids: list[int] = list(bos) if rendered.add_bos else []
    labels = [IGNORE_INDEX] * len(ids)
    answer_start = None
    text_start = len(ids)
    spans: list[Span] = []
    marks = {placeholder(m): m for m in slots}
    for text, trained in rendered.segments:
        if trained:
            answer_start = len(ids)
        for part in _placeholders(tuple(slots)).split(text) if slots else [text]:
            if part in marks:
                spans.append((marks[part], len(ids)))
                ids += [eos_id] * slots[marks[part]].tokens
                labels += [IGNORE_INDEX] * slots[marks[part]].tokens
                continue
            piece = encode_segment(part, len(ids) == text_start) if part else []  # first: nothing encoded yet
            ids += piece
            labels += piece if (trained or train_on_prompt) else [IGNORE_INDEX] * len(piece)
    if rendered.add_eos:
        if answer_start is None:
            answer_start = len(ids)
        ids.append(eos_id)
        labels.append(eos_id)
    return ids, labels, len(ids) if answer_start is None else answer_start, spans


def truncate(ids: list[int], labels: list[int], answer_start: int, keep_front: int,
             max_length: int, mode: str) -> tuple[list[int], list[int], str]:
    """Shorten one example to max_length. Returns (ids, labels, outcome).

    outcome: 'fit' (unchanged), 'truncated', 'answer_cut' (trained tokens of the final answer
    were cut from its end) or 'dropped'. Mode 'prompt' removes context tokens from the left, after
    the first `keep_front` tokens (BOS); 'end' cuts the end; 'drop' drops the example.
    """
    if len(ids) <= max_length:
        return ids, labels, "fit"
    if mode == "drop":
        return [], [], "dropped"
    if mode == "end":
        cut = any(label != IGNORE_INDEX for label in labels[max_length:])
        return ids[:max_length], labels[:max_length], "answer_cut" if cut else "truncated"
    keep_front = min(keep_front, answer_start)
    room = max_length - keep_front - (len(ids) - answer_start)  # context tokens that still fit
    if room >= 0:
        cut = slice(answer_start - room, answer_start)
        return (ids[:keep_front] + ids[cut] + ids[answer_start:],
                labels[:keep_front] + labels[cut] + labels[answer_start:], "truncated")
    tail = max_length - keep_front
    return (ids[:keep_front] + ids[answer_start:answer_start + tail],
            labels[:keep_front] + labels[answer_start:answer_start + tail], "answer_cut")


def resolve_format(rows: list[Any], cfg: DataConfig, pairs: bool = False) -> RowFormat:
    """cfg.format, or the format detected from the columns (after mapping) of the rows; `pairs`: the run trains
    on preference rows (a preference objective), else on SFT rows. Rows of the other kind are a DataError."""
    if cfg.format != "auto":
        return check_kind(FORMATS[cfg.format], pairs)
    columns: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
    if cfg.columns:
        columns = {k: None for k in columns if k not in cfg.columns.values()} | dict.fromkeys(cfg.columns)
    return detect_format(columns, pairs)


def check_tokenizer(tokenizer: Any) -> None:
    """A DataError unless the tokenizer has the EOS that answers end with."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("the tokenizer has no eos_token: set one (tokenizer.eos_token = ...) so that "
                        "answers end with a trained end-of-sequence token")


def keep_front(ids: list[int], bos: list[int], tokenizer: Any) -> int:
    """How many leading tokens of `ids` (its BOS) truncation 'prompt' keeps."""
    if bos and ids[:len(bos)] == bos:
        return len(bos)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return 1 if ids and bos_id is not None and ids[0] == bos_id else 0


def rendered_rows(rows: list[Any], render: Callable[[dict[str, Any], Any, DataConfig], Any], tokenizer: Any,
                  cfg: DataConfig, stats: TokenizeStats) -> Iterator[tuple[int, Any]]:
    """(index, rendered row) of each row, its columns mapped; a row that does not fit its format is a DataError
    naming the row, or (cfg.skip_bad_rows) skipped and counted in `stats`."""
    for k, row in enumerate(rows):
        try:
            rendered = render(apply_columns(row, cfg.columns), tokenizer, cfg)
        except RowError as error:
            if cfg.skip_bad_rows:
                stats.n_skipped_bad_rows += 1
                continue
            raise DataError(f"{place_of(rows, k)}: {error}{_format_hint(row, cfg)}") from None
        yield k, rendered


def _format_hint(row: Any, cfg: DataConfig) -> str:
    """For a row that does not fit a data.format set by name: the format its columns look like, if another."""
    if cfg.format == "auto" or not isinstance(row, dict):
        return ""
    try:
        found = detect_format(apply_columns(row, cfg.columns), FORMATS[cfg.format].pairs)
    except DataError:
        return ""
    return ("" if found.name == cfg.format else
            f"; data.format is {cfg.format}, but these columns look like {found.name} rows: set "
            f"data.format={found.name} (or auto)")


def n_trained(labels: list[int]) -> int:
    """The trained tokens of an example (labels[0] is never a target: nothing predicts it)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def untrained_error(place: str, fmt: RowFormat, cfg: DataConfig, what: str = "") -> DataError:
    """The error for an example left with no trained token (`what`: which side of a pair, if any)."""
    return DataError(f"{place}: no trained token left{what} (max_length={cfg.max_length}, {fmt.name} format, "
                     f"truncation '{cfg.truncation}'); raise data.max_length, use truncation 'prompt', or set "
                     "data.drop_untrained")


def media_folder(rows: list[Any], cfg: DataConfig) -> Path:
    """Where relative media paths of `rows` are read from: data.media_dir, else the local folder the rows were read
    from, else the current folder."""
    if cfg.media_dir:
        return Path(cfg.media_dir).expanduser()
    folder = rows.places.folder if isinstance(rows, NumberedRows) else None
    return folder if folder is not None else Path.cwd()


def media_renderer(render: Callable, slots: dict[str, MediaSlot], folder: Path) -> Callable:
    """`render` that also decodes the row's items (data/media.py); their problems are row errors."""
    def render_with_media(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Rendered:
        return attach_media(render(row, tokenizer, cfg), row, slots, folder)
    return render_with_media


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig,
                  slots: dict[str, MediaSlot] | None = None) -> tuple[list[Example], TokenizeStats]:
    """Render, tokenize, mask and truncate rows. Raises DataError naming the first bad row.

    A bad row is named by its place: its file and line (or row) when it comes from load_rows,
    else 'row N' (1-based) in the order given (data/rows.py). Bad rows are skipped and counted when
    cfg.skip_bad_rows is on. An example with no trained token (after truncation) is an error
    naming the row unless cfg.drop_untrained is on; so is a list of rows that yields nothing.
    Preference rows are an error: they are tokenized in pairs (data/preference.py).

    `slots` (a method's `media_slots()`): each placeholder of those modalities becomes the slot's positions and
    the row's items are decoded into the example's "media" (data/media.py). Truncation never cuts an item: an
    example with items that is too long is dropped under truncation 'drop', else an error naming the row.
    """
    if not rows:
        return [], TokenizeStats()
    check_tokenizer(tokenizer)
    fmt = resolve_format(rows, cfg)
    bos = bos_prefix(tokenizer)
    encode_segment = segment_encoder(tokenizer)
    stats = TokenizeStats(n_rows=len(rows))
    examples: list[Example] = []
    slots = slots or {}
    render = media_renderer(fmt.render, slots, media_folder(rows, cfg)) if slots else fmt.render
    for k, rendered in rendered_rows(rows, render, tokenizer, cfg, stats):
        rendered.add_eos = rendered.add_eos and cfg.add_eos
        ids, labels, answer_start, spans = encode_with_media(rendered, encode_segment, bos, tokenizer.eos_token_id,
                                                             cfg.train_on_prompt, slots)
        if spans and len(ids) > cfg.max_length and cfg.truncation != "drop":
            raise DataError(f"{place_of(rows, k)}: {len(ids)} tokens with its items' soft tokens, over "
                            f"data.max_length={cfg.max_length}; items are never cut: raise data.max_length, or set "
                            "data.truncation: drop")
        ids, labels, outcome = truncate(ids, labels, answer_start, keep_front(ids, bos, tokenizer),
                                        cfg.max_length, cfg.truncation)
        stats.n_truncated += outcome in ("truncated", "answer_cut")
        stats.n_answers_cut += outcome == "answer_cut"
        trained = n_trained(labels)
        if outcome != "dropped" and trained == 0:
            if not cfg.drop_untrained:
                raise untrained_error(place_of(rows, k), fmt, cfg)
            outcome = "dropped"
        if outcome == "dropped":
            stats.n_dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels} if not spans else
                        {"input_ids": ids, "labels": labels, "media": media_of(spans, rendered.media)})
        stats.n_trained_tokens += trained
        stats.n_tokens += len(ids)
    stats.n_examples = len(examples)
    if not examples:
        raise DataError(f"none of the {len(rows)} rows gave an example ({stats.summary()})")
    return examples, stats


def truncation_warnings(stats: TokenizeStats, cfg: DataConfig, rows: str = "training rows") -> list[str]:
    """'warning:' lines for truncation that changes what is learned: most rows truncated, or any answer cut."""
    fix = "raise data.max_length, or set data.truncation: drop to leave long rows out"
    lines = []
    if stats.n_truncated * 2 > stats.n_rows:
        lines.append(f"warning: {stats.n_truncated} of {stats.n_rows} {rows} were truncated to "
                     f"data.max_length={cfg.max_length} tokens; {fix}")
    if stats.n_answers_cut:
        lines.append(f"warning: {stats.n_answers_cut} of {stats.n_rows} {rows} had their answer cut at "
                     f"data.max_length={cfg.max_length} tokens (the model learns answers that stop short); {fix}")
    return lines


def media_of(spans: list[Span], media: dict[str, list[Any]]) -> list[tuple[str, int, Any]]:
    """(modality, start, decoded item) of each span: a modality's spans take its items in order."""
    taken = {modality: iter(items) for modality, items in media.items()}
    return [(modality, start, next(taken[modality])) for modality, start in spans]


def preview_example(example: Example, tokenizer: Any, slots: dict[str, MediaSlot] | None = None) -> str:
    """The example as text with every trained span wrapped in [[...]] (pre-flight check); with the run's `slots`,
    each item's soft tokens show as `<image:16 soft tokens>`."""
    parts: list[str] = []
    run: list[int] = []
    run_trained = False
    items = {start: modality for modality, start, _ in example.get("media", ())} if slots else {}
    skip = 0
    for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
        if position in items:
            parts += [_show(run, run_trained, tokenizer)] if run else []
            run, skip = [], slots[items[position]].tokens
            parts.append(f"<{items[position]}:{skip} soft tokens>")
        if skip:
            skip -= 1
            continue
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            parts.append(_show(run, run_trained, tokenizer))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        parts.append(_show(run, run_trained, tokenizer))
    return "".join(parts)


def _show(ids: list[int], trained: bool, tokenizer: Any) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[[{text}]]" if trained else text
