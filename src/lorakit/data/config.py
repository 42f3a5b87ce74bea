"""`DataConfig`: where the rows come from, how they are read, and how they become tokens.

Every field is a `lorakit.schema.setting`: its doc is the `--help` text, its checks run when the
config is built (from YAML, the command line or Python alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from lorakit.data.formats import FORMATS
from lorakit.fielddocs import field_docs
from lorakit.schema import Config, setting

Truncation = Literal["prompt", "end", "drop"]
TRUNCATION_MODES = get_args(Truncation)


def format_names() -> tuple[str, ...]:
    """'auto' and every registered row format (the registry can grow after import)."""
    return ("auto", *FORMATS)


@dataclass
class DataConfig(Config):
    """The data section of a lorakit config: source, split, format, masking, length, packing."""

    section: ClassVar[str] = "data"

    source: str | list[dict[str, Any]] | None = setting(
        None, "Rows to train on: a Hugging Face hub dataset id (needs a network), a local "
              ".json/.jsonl/.csv/.parquet file, or a folder of such files. From Python, a list of "
              "dicts is accepted as well.")
    subset: str | None = setting(
        None, "Hub dataset configuration name (the `name` of datasets.load_dataset), if it has several.")
    split: str = setting("train", "Split of `source` to train on. Local files have a single 'train' split.")
    limit: int | None = setting(
        None, "Use only the first N rows of the split (after shuffling, if `shuffle` is on).", ge=1)
    shuffle: bool = setting(
        False, "Shuffle the rows with `seed` before applying `limit` and holding out `val_fraction`. "
               "Row numbers in error messages then count the shuffled order.")
    seed: int = setting(0, "Seed for `shuffle` and for the `val_fraction` hold-out.")
    val_source: str | list[dict[str, Any]] | None = setting(
        None, "Validation rows from a separate source (same kinds as `source`). Its split is "
              "`val_split`, or 'train' when `val_split` is unset.")
    val_split: str | None = setting(
        None, "Validation split name: of `val_source` when set, otherwise of `source` (e.g. 'test').")
    val_fraction: float = setting(
        0.0, "Hold out this fraction of the training rows (seeded, at least one row) for validation. "
             "Used only when neither `val_source` nor `val_split` is set; 0 means no validation.", ge=0, lt=1)
    val_limit: int | None = setting(None, "Use only the first N validation rows.", ge=1)
    format: str = setting(
        "auto", "Row format: 'auto' (detect from the columns), 'prompt_completion', 'alpaca' "
                "(instruction, input, output), 'chat' (a `messages` list of {role, content}, or ShareGPT's "
                "`conversations` of {from, value}), 'text' (plain text, every token trained) or 'preference' (a prompt "
                "with a chosen and a rejected answer, as text or chat messages; or chosen and rejected "
                "conversations that share their prompt; for the preference objectives, train.objective dpo, "
                "ipo, simpo, orpo). auto looks among the formats of the run's objective.", choices=format_names)
    columns: dict[str, str] = setting(
        doc="Column mapping {format field: dataset column}, applied before the format reads a row; "
            "e.g. {prompt: act, completion: prompt} for fka/awesome-chatgpt-prompts.", factory=dict)
    prompt_template: str = setting(
        "{prompt}", "Template for the prompt of 'prompt_completion' rows: '{prompt}' is replaced by the "
                    "prompt, e.g. '{prompt}\\n' puts a newline between prompt and completion.")
    system_prompt: str | None = setting(None, "System message prepended to chat rows that do not start with one.")
    chat_template: str | None = setting(
        None, "Jinja chat template overriding the tokenizer's own; 'builtin' forces lorakit's "
              "built-in template (also used when the tokenizer has none).")
    max_row_bytes: int = setting(
        8 * 2**20, "Largest row accepted, in bytes: a line of a JSON lines or CSV file (refused before it is "
                   "read whole, so one huge line cannot exhaust memory), an element of a JSON array, or the "
                   "text of a parquet, hub or in-memory row. A larger row is an error naming it, raised "
                   "before anything is tokenized. The default is 8 MiB.", ge=1)
    max_length: int = setting(1024, "Longest example in tokens; longer ones are truncated.", ge=2)
    truncation: Truncation = setting(
        "prompt", "How examples longer than `max_length` are shortened: 'prompt' cuts context from the "
                  "left (keeping BOS and the final answer whole; an answer that alone is too long is cut "
                  "at its end), 'end' cuts the end, 'drop' drops the example. All are counted. A preference "
                  "pair is cut as one: both sides keep the same prompt tokens, as many as fit beside the "
                  "longer answer; 'drop' drops the pair when either side is too long.")
    drop_untrained: bool = setting(
        False, "Drop (and count) examples left with no trained token after truncation, instead of "
               "failing with an error that names the row.")
    train_on_prompt: bool = setting(
        False, "Train on every token, prompts included (turns the output-only loss mask off).")
    add_eos: bool = setting(
        True, "End each SFT example with the tokenizer's EOS token, trained, so the model learns to stop. false: "
              "no EOS is appended (as transformers' DataCollatorForLanguageModeling trains plain text: the "
              "bloomz-awesome-prompts recipe as the lecture wrote it). Chat rows end as their template says.")
    skip_bad_rows: bool = setting(
        False, "Skip (and count) rows that do not fit the format instead of failing on the first one.")
    packing: bool | Literal["auto"] = setting(
        "auto", "Pack examples into rows of at most `max_length` tokens, each example attending only to itself "
                "(block-diagonal causal mask, restarted position ids). true: the whole epoch packed best-fit, "
                "micro_batch_size rows per micro-batch (fewer, fuller steps), after a leak probe on the model (an "
                "error if it fails). auto (the default): where the leak probe shows the model exact at "
                "`max_length`, each micro-batch keeps the examples it has unpacked (the same steps) and packs "
                "them into rows instead of padding them; else unpacked, with a one-line note (always for prompt "
                "tuning and under LORAKIT_AUTO=off). false: padded. Preference pairs: true and auto lay each pair "
                "out as one row with its prompt once, where the shared-prompt probe passes on the model (true: an "
                "error when it fails; auto: padded pairs then, and under LORAKIT_AUTO=off); false: padded pairs. "
                "The run prints what auto chose.")
    media_dir: str | None = setting(
        None, "Folder that relative image paths in rows (the `images` column) are read from; default: the folder of "
              "the data file (the data folder itself for a folder source), else the current folder.")
    cache_dir: str | None = setting(
        None, "Cache folder for Hugging Face datasets (default: the datasets library's own).")

    def problems(self) -> list[tuple[str, str]]:
        """Rules across fields, and the one placeholder the prompt template must hold."""
        found = []
        if self.val_fraction > 0 and (self.val_source is not None or self.val_split is not None):
            found.append(("val_fraction", "cannot be combined with data.val_source or data.val_split: choose "
                                          "one way to get validation rows"))
        if "{prompt}" not in self.prompt_template:
            found.append(("prompt_template", "must contain '{prompt}'"))
        return found


def field_help() -> dict[str, str]:
    """{field name: help text} for every DataConfig field (for --help and docs)."""
    return field_docs(DataConfig)
