"""What a run's prompts looked like, recorded beside its adapter and applied again at inference.

Training renders a row through its format (data/formats.py, data/chat.py): the untrained
segments are the prompt, the last trained segment the answer. Inference must give the model
the same prompt for a plain question, so it uses the very same renderers: the question becomes
a row of the run's format with a placeholder answer, and everything before the answer is the
prompt, tokenized exactly as in training (segment by segment, with the same BOS rule):

    prompt_completion  {"prompt": q, "completion": "x"}     -> prompt_template with q
    alpaca             {"instruction": q, "output": "x"}    -> the Alpaca header, instruction, "### Response:"
    chat               messages + {"assistant": "x"}        -> the chat template up to the answer cue
    text               q itself (a text run continues raw text)

`RunRecord` is what a run writes to `lorakit_run.json` inside its adapter (or model) folder, so it
travels when the folder is copied or published (peft and vLLM read adapter_config.json, whose keys
stay as peft writes them): the prompt format (the chat template's text itself, not a reference to
a tokenizer that may change), the end-of-turn marker the model learned to emit, the base model as
a hub id or an absolute path, and a cheap fingerprint of the base's weight files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.chat import chat_template_for
from lorakit.data.config import DataConfig
from lorakit.data.formats import FORMATS, apply_columns
from lorakit.data.media import attach_media
from lorakit.data.rows import Rendered
from lorakit.data.tokenize import Span, bos_prefix, encode_with_media, media_of, segment_encoder
from lorakit.errors import DataError, LorakitError
from lorakit.media import MediaItem, MediaSlot

RECORD_NAME = "lorakit_run.json"
RECORD_VERSION = 1
RUN_OUTPUTS = ("adapter", "model")  # the folder a run saves its result in (method.output)
PLACEHOLDER = "x"  # the answer a question's row gets, so its prompt renders exactly as a trained row's


@dataclass(frozen=True)
class PromptFormat:
    """How a run's rows became prompts: the row format and the templates it used."""

    format: str  # prompt_completion, alpaca, chat, text (a registered row format)
    prompt_template: str = "{prompt}"
    system_prompt: str | None = None
    chat_template: str | None = None  # chat: the Jinja text that rendered the rows, or "builtin"

    @classmethod
    def of_run(cls, cfg: DataConfig, format_name: str, tokenizer: Any) -> PromptFormat:
        """The format a run with data config `cfg` rendered its rows in (`format_name`: the resolved format)."""
        template = None
        if format_name == "chat":
            text, builtin = chat_template_for(tokenizer, cfg)
            template = "builtin" if builtin else (text or tokenizer.chat_template)
        return cls(format_name, cfg.prompt_template, cfg.system_prompt, template)

    def data_config(self) -> DataConfig:
        """A DataConfig that renders rows the way the run did."""
        return DataConfig(format=self.format, prompt_template=self.prompt_template, system_prompt=self.system_prompt,
                          chat_template=self.chat_template)

    def describe(self, tokenizer: Any = None) -> str:
        """A few words for the command line: which format the prompts get (`tokenizer`: the one they go
        through, which decides the chat template when none is recorded)."""
        if self.format == "chat":
            if self.chat_template == "builtin" or (self.chat_template is None and tokenizer is not None
                                                   and not getattr(tokenizer, "chat_template", None)):
                return "chat (lorakit's built-in template)"
            return f"chat ({'the tokenizer' if self.chat_template is None else 'the run'}'s chat template)"
        if self.format == "prompt_completion" and self.prompt_template != "{prompt}":
            return f"prompt_completion (prompt_template {self.prompt_template!r})"
        return self.format

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """Token ids of a plain question as the run's prompt (text runs: the text itself)."""
        return self.messages_ids(tokenizer, [{"role": "user", "content": prompt}])

    def messages_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation up to the answer cue. Formats without turns take the last user message."""
        return self.media_ids(tokenizer, messages, {})[0]

    def media_ids(self, tokenizer: Any, messages: list[dict[str, str]], slots: dict[str, MediaSlot]
                  ) -> tuple[list[int], list[Span]]:
        """`messages_ids`, each placeholder of a modality in `slots` (`<image>`) taking its slot's positions as in
        training (data/tokenize.py), and each item's (modality, start) in the ids."""
        if self.format == "chat":
            row: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": PLACEHOLDER}]}
        else:
            users = [m["content"] for m in messages if m.get("role") == "user"]
            if not users:
                raise DataError("a conversation without a user message has no question to prompt with")
            row = _question_row(self.format, users[-1])
            if row is None:
                return _encode(Rendered([(users[-1], False)], add_eos=False), tokenizer, slots)
        return _encode(self._prompt(row, tokenizer)[0], tokenizer, slots)

    def split(self, row: dict[str, Any], tokenizer: Any, columns: dict[str, str] | None = None
              ) -> tuple[list[int], str]:
        """(prompt ids, reference answer) of a data row in this format: the last trained segment is the
        answer (its end-of-turn marker removed), everything before it the prompt."""
        return self.split_media(row, tokenizer, columns)[:2]

    def split_media(self, row: dict[str, Any], tokenizer: Any, columns: dict[str, str] | None = None,
                    slots: dict[str, MediaSlot] | None = None, folder: Path | None = None
                    ) -> tuple[list[int], str, list[MediaItem]]:
        """`split`, and the prompt's items: each placeholder of a modality in `slots` takes its slot's positions
        and the row's items are decoded (relative paths from `folder`) as training does (data/tokenize.py,
        data/media.py), so the prompt ids are the first ids of the row's training example."""
        row = apply_columns(row, columns or {})
        prompt, answer = self._prompt(row, tokenizer)
        if slots:
            attach_media(prompt, row, slots, folder or Path.cwd())
        ids, spans = _encode(prompt, tokenizer, slots or {})
        return ids, answer, media_of(spans, prompt.media)

    def _prompt(self, row: dict[str, Any], tokenizer: Any) -> tuple[Rendered, str]:
        """(the prompt's segments, the reference answer) of a data row (see `split`)."""
        rendered = FORMATS[self.format].render(row, tokenizer, self.data_config())
        last = max((i for i, (_, trained) in enumerate(rendered.segments) if trained), default=None)
        if last is None or self.format == "text":
            raise DataError(f"a {self.format} row has no prompt to answer; score text runs by loss only")
        prompt = Rendered(rendered.segments[:last], add_bos=rendered.add_bos, add_eos=False)
        answer = rendered.segments[last][0]
        marker = self.end_of_turn(tokenizer)
        if marker and answer.rstrip().endswith(marker):
            answer = answer.rstrip()[:-len(marker)]
        return prompt, answer.strip()

    def end_of_turn(self, tokenizer: Any) -> str | None:
        """The text the model learned to end its answer with, when it is not the tokenizer's EOS (chat templates'
        end-of-turn markers such as <|im_end|>); EOS itself for formats that append it."""
        if self.format != "chat":
            return tokenizer.eos_token
        return _chat_end_of_turn(self, tokenizer)

    def stop_ids(self, tokenizer: Any) -> set[int]:
        """Token ids that end an answer: EOS and the end-of-turn marker when it is one token."""
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        marker = self.end_of_turn(tokenizer)
        if marker:
            encoded = tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(encoded[0])
        return ids


@functools.lru_cache(maxsize=16)  # split() asks once per scored row: render the template once per format
def _chat_end_of_turn(prompt_format: PromptFormat, tokenizer: Any) -> str | None:
    rendered = FORMATS["chat"].render({"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": PLACEHOLDER}]},
                                      tokenizer, prompt_format.data_config())
    trained = next(text for text, is_trained in rendered.segments if is_trained)
    return trained[trained.find(PLACEHOLDER) + len(PLACEHOLDER):].strip() or None


def _question_row(format_name: str, question: str) -> dict[str, str] | None:
    """The row of `format_name` whose prompt is `question` (None: the format has no prompt field)."""
    if format_name == "alpaca":
        return {"instruction": question, "output": PLACEHOLDER}
    if format_name == "prompt_completion":
        return {"prompt": question, "completion": PLACEHOLDER}
    if format_name in ("chat", "text"):
        return None
    raise DataError(f"row format {format_name!r} has no rule for turning a question into a prompt")


def _encode(rendered: Rendered, tokenizer: Any, slots: dict[str, MediaSlot]) -> tuple[list[int], list[Span]]:
    ids, _, _, spans = encode_with_media(rendered, segment_encoder(tokenizer), bos_prefix(tokenizer),
                                         tokenizer.eos_token_id, False, slots)
    return ids, spans


@dataclass
class RunRecord:
    """lorakit_run.json: what inference needs to reproduce a run's inputs (see the module docstring)."""

    prompt: PromptFormat
    base_model: str  # a hub id, an absolute path, or "embedded"
    revision: str | None = None
    fingerprint: dict[str, Any] | None = None  # models.fingerprint of the base's weight files
    end_of_turn: str | None = None
    tokens: dict[str, Any] = field(default_factory=dict)  # the special tokens training used (see special_tokens)

    def write(self, folder: str | Path) -> Path:
        """Write the record into `folder` (an adapter or model folder)."""
        path = Path(folder) / RECORD_NAME
        body = {"lorakit_run_record": RECORD_VERSION, "prompt": dataclasses.asdict(self.prompt),
                "base_model": self.base_model, "revision": self.revision, "fingerprint": self.fingerprint,
                "end_of_turn": self.end_of_turn, "tokens": self.tokens}
        path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    """The special tokens a run's batches used: BOS, EOS (trained after every answer), the pad token (never
    trained; lorakit sets it to EOS when the tokenizer has none) and the tokens added to the tokenizer's vocabulary."""
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "added_tokens": sorted(added)}


def read_record(folder: str | Path) -> RunRecord | None:
    """The record in an adapter or model folder; None when the folder predates records (or is not a run's)."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        version = body["lorakit_run_record"]
        if version != RECORD_VERSION:
            raise DataError(f"{path}: record version {version!r}; this lorakit reads version {RECORD_VERSION}")
        prompt = PromptFormat(**body["prompt"])
        if prompt.format not in FORMATS:
            raise DataError(f"{path}: unknown row format {prompt.format!r}")
        return RunRecord(prompt, str(body["base_model"]), body.get("revision"), body.get("fingerprint"),
                         body.get("end_of_turn"), dict(body.get("tokens") or {}))
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a readable lorakit run record: {error}") from error


# --- where a run's record lives: adapter, fine-tuned model and run folders -----------------------------

def output_folder(path: str | Path) -> Path:
    """An adapter or model folder; a run folder gives its adapter/ (or model/ for full fine-tuning)."""
    folder = Path(path)
    if (folder / "config.yaml").is_file():
        for name in RUN_OUTPUTS:
            if (folder / name).is_dir():
                return folder / name
    return folder


def run_name(path: str | Path) -> str:
    """The name an adapter goes by: its run folder's (runs/a/adapter -> a, runs/a -> a), else its own."""
    folder = Path(path).expanduser().resolve()
    return folder.parent.name if folder.name in RUN_OUTPUTS and folder.parent.name else folder.name


def is_model_folder(folder: str | Path) -> bool:
    """A whole model (what full fine-tuning saves), not an adapter."""
    return (Path(folder) / "config.json").is_file() and not (Path(folder) / "adapter_config.json").is_file()


def adapter_config_base(folder: str | Path) -> str:
    """The base an adapter folder names in adapter_config.json (base_model_name_or_path)."""
    config = Path(folder) / "adapter_config.json"
    try:
        name = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise LorakitError(f"cannot read {config}: {error}") from error
    if not name:
        raise LorakitError(f"{config} names no base_model_name_or_path; pass the base model with --model")
    return str(name)
