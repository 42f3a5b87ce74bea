"""`DataConfig`: where the rows come from, how they are read, and how they become tokens.

Every field carries `metadata["help"]`, which the CLI turns into `--help` text and YAML docs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lorakit.data.formats import FORMATS
from lorakit.errors import ConfigError

TRUNCATION_MODES = ("prompt", "end", "drop")


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text is readable programmatically."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    """The data section of a lorakit config: source, split, format, masking, length, packing."""

    source: str | list[dict[str, Any]] | None = _doc(
        "Rows to train on: a Hugging Face hub dataset id (needs a network), a local "
        ".json/.jsonl/.csv/.parquet file, or a folder of such files. From Python, a list of "
        "dicts is accepted as well.",
        default=None,
    )
    subset: str | None = _doc(
        "Hub dataset configuration name (the `name` of datasets.load_dataset), if it has several.",
        default=None,
    )
    split: str = _doc("Split of `source` to train on. Local files have a single 'train' split.",
                      default="train")
    limit: int | None = _doc(
        "Use only the first N rows of the split (after shuffling, if `shuffle` is on).",
        default=None,
    )
    shuffle: bool = _doc(
        "Shuffle the rows with `seed` before applying `limit` and holding out `val_fraction`. "
        "Row numbers in error messages then count the shuffled order.",
        default=False,
    )
    seed: int = _doc("Seed for `shuffle` and for the `val_fraction` hold-out.", default=0)
    val_source: str | list[dict[str, Any]] | None = _doc(
        "Validation rows from a separate source (same kinds as `source`). Its split is "
        "`val_split`, or 'train' when `val_split` is unset.",
        default=None,
    )
    val_split: str | None = _doc(
        "Validation split name: of `val_source` when set, otherwise of `source` (e.g. 'test').",
        default=None,
    )
    val_fraction: float = _doc(
        "Hold out this fraction of the training rows (seeded, at least one row) for validation. "
        "Used only when neither `val_source` nor `val_split` is set; 0 means no validation.",
        default=0.0,
    )
    val_limit: int | None = _doc("Use only the first N validation rows.", default=None)
    format: str = _doc(
        "Row format: 'auto' (detect from the columns), 'prompt_completion', 'alpaca' "
        "(instruction, input, output), 'chat' (a `messages` list of {role, content}) or 'text' "
        "(plain text, every token trained).",
        default="auto",
    )
    columns: dict[str, str] = _doc(
        "Column mapping {format field: dataset column}, applied before the format reads a row; "
        "e.g. {prompt: act, completion: prompt} for fka/awesome-chatgpt-prompts.",
        default_factory=dict,
    )
    prompt_template: str = _doc(
        "Template for the prompt of 'prompt_completion' rows: '{prompt}' is replaced by the "
        "prompt, e.g. '{prompt}\\n' puts a newline between prompt and completion.",
        default="{prompt}",
    )
    system_prompt: str | None = _doc(
        "System message prepended to chat rows that do not start with one.", default=None
    )
    chat_template: str | None = _doc(
        "Jinja chat template overriding the tokenizer's own; 'builtin' forces lorakit's "
        "built-in template (also used when the tokenizer has none).",
        default=None,
    )
    max_length: int = _doc("Longest example in tokens; longer ones are truncated.", default=1024)
    truncation: str = _doc(
        "How examples longer than `max_length` are shortened: 'prompt' cuts context from the "
        "left (keeping BOS and the final answer whole; an answer that alone is too long is cut "
        "at its end), 'end' cuts the end, 'drop' drops the example. All are counted.",
        default="prompt",
    )
    drop_untrained: bool = _doc(
        "Drop (and count) examples left with no trained token after truncation, instead of "
        "failing with an error that names the row.",
        default=False,
    )
    train_on_prompt: bool = _doc(
        "Train on every token, prompts included (turns the output-only loss mask off).",
        default=False,
    )
    skip_bad_rows: bool = _doc(
        "Skip (and count) rows that do not fit the format instead of failing on the first one.",
        default=False,
    )
    packing: bool = _doc(
        "Pack several examples into each row of `max_length` tokens, each example attending "
        "only to itself (block-diagonal causal mask, restarted position ids).",
        default=False,
    )
    cache_dir: str | None = _doc(
        "Cache folder for Hugging Face datasets (default: the datasets library's own).",
        default=None,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        if self.format != "auto" and self.format not in FORMATS:
            choices = ", ".join(["auto", *FORMATS])
            raise ConfigError(f"data.format: unknown format {self.format!r} (choose from {choices})")
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"data.truncation: unknown mode {self.truncation!r} "
                              f"(choose from {', '.join(TRUNCATION_MODES)})")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {self.max_length}")
        for name in ("limit", "val_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be a positive number of rows, got {value}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and (self.val_source is not None or self.val_split is not None):
            raise ConfigError("data.val_fraction cannot be combined with data.val_source or "
                              "data.val_split: choose one way to get validation rows")
        if not isinstance(self.columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items()
        ):
            raise ConfigError(f"data.columns must map field names to column names, got {self.columns!r}")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(f"data.prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")


def field_help() -> dict[str, str]:
    """{field name: help text} for every DataConfig field (for --help and docs)."""
    return {f.name: f.metadata["help"] for f in fields(DataConfig)}
