"""Score a model (optionally with an adapter) on a dataset (the `lorakit evaluate` command is commands/evaluate.py).

`evaluate` scores plain rows as typed (the sweeps and the lab use it): rows with "prompt" and
"completion" three ways, the greedy answer's exact-match and contains accuracy and the mean token
loss (and perplexity) of the reference completion plus EOS; rows with only "text" (e.g. the
general-text set used to measure forgetting) get the loss.

`evaluate_rows` scores rows of any training format (prompt/completion, alpaca, chat, text) the way
a run saw them: prompts through the run's PromptFormat, the loss exactly as training defined it,
and the same scores per group of rows (a "kind" column, say); rows with images through the model's
modality adapter, with their images, as training laid them out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from lorakit.adapters.modality import modality_slots
from lorakit.data.chat import content_text
from lorakit.data.config import DataConfig
from lorakit.data.formats import apply_columns
from lorakit.data.media import row_items
from lorakit.data.prompting import PromptFormat
from lorakit.data.rows import keep_places, place_of
from lorakit.data.sources import load_rows
from lorakit.data.tokenize import media_folder, resolve_format, tokenize_rows
from lorakit.errors import DataError
from lorakit.infer.generate import CHAT, chat_words, greedy_generate, greedy_ids, stop_token_ids
from lorakit.infer.metrics import accuracy, example_losses, loss_summary, token_loss
from lorakit.media import KINDS, MediaItem, MediaSlot, placeholder
from lorakit.run import pad_id_of


def evaluate(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 16,
             batch_size: int = 32, generate: bool = True) -> dict:
    """Accuracy (exact-match, contains) and loss/perplexity of `model` on `rows`.

    Returns {"n", "exact_match", "contains", "loss", "perplexity", "tokens", "predictions"}; the
    accuracy keys (and predictions) are present only for prompt/completion rows with `generate`.
    """
    if not rows:
        raise DataError("nothing to evaluate: the dataset has no rows")
    if all("text" in row and "completion" not in row for row in rows):
        pairs = [("", str(row["text"])) for row in rows]
        return {"n": len(rows), **token_loss(model, tokenizer, pairs, batch_size=batch_size)}
    for index, row in enumerate(rows):
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise DataError(f"row {index}: field {field!r} is missing or not a string "
                                "(evaluate needs prompt/completion rows, or text rows)")
    prompts = [row["prompt"] for row in rows]
    references = [row["completion"] for row in rows]
    result: dict = {"n": len(rows)}
    if generate:
        predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)
        result.update(accuracy(predictions, references))
        result["predictions"] = predictions
    result.update(token_loss(model, tokenizer, list(zip(prompts, references)),
                             batch_size=batch_size))
    return result


def read_rows(path: str | Path, *, prompt_column: str = "prompt",
              completion_column: str = "completion", limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a local data file (json, jsonl, csv, parquet: the training reader, data.load_rows),
    with the given columns renamed to prompt/completion; they remember their places and folder (relative image
    paths are read from it, as in training)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows, _ = load_rows(DataConfig(source=str(path)))
    renamed = []
    for row in rows[:limit]:
        row = dict(row)
        if prompt_column in row:
            row["prompt"] = row.pop(prompt_column)
        if completion_column in row:
            row["completion"] = row.pop(completion_column)
        renamed.append(row)
    return keep_places(renamed, rows)


# --- rows of any training format, scored as the run saw them ----------------------------------------------

GROUP_COLUMNS = ("kind", "category", "task")  # a row column that groups the scores, when present


def scoring_format(rows: Sequence[dict], columns: dict[str, str], tokenizer, *, recorded: PromptFormat | None = None,
                   where: str = "", raw: bool = False, chat: bool = False, forced: str | None = None
                   ) -> tuple[PromptFormat, str]:
    """(the format the rows are scored in, one line saying which and why) under infer/generate.py's rule:
    the run's `recorded` format (`where`: "recorded with FOLDER" or the like), else --raw (prompt/completion rows
    as typed), --chat (the chat template) or --format; else the format the rows' columns show."""
    if raw and chat:
        raise DataError("--raw and --chat exclude each other")
    detected = resolve_format(list(rows), DataConfig(format=forced or "auto", columns=columns)).name
    if detected == "text":
        return PromptFormat("text"), "rows: text, scored by loss only (a text row has no answer to generate)"
    if chat:
        turned = "" if detected == "chat" else f"; {detected} rows become one-turn conversations"
        return CHAT, f"prompt format: {chat_words(tokenizer)} (--chat{turned})"
    if raw:
        if detected != "prompt_completion":
            raise DataError(f"--raw scores prompt/completion rows with their prompts as typed; these are {detected} "
                            "rows: drop --raw (or pass --format prompt_completion with --columns)")
        return PromptFormat(detected), "prompt format: none, prompts go as typed (--raw)"
    if recorded is not None and (forced is None or forced == recorded.format):
        if detected != recorded.format:
            raise DataError(f"the rows are {detected} rows, but the run was trained on {recorded.format} rows; "
                            f"pass --format {detected} to score them in their own format, or --chat")
        return recorded, f"prompt format: {recorded.describe(tokenizer)} ({where}; --raw sends prompts as typed)"
    why = "--format" if forced else "detected from the rows' columns; --format to choose another"
    trained = f"; the run used {recorded.describe(tokenizer)}" if recorded is not None else ""
    return PromptFormat(detected), f"prompt format: {detected} ({why}{trained})"


def as_conversation(row: dict, format_name: str, columns: dict[str, str]) -> dict:
    """A prompt/completion or alpaca row as a one-turn chat row (for --chat); chat rows as they are."""
    row = apply_columns(row, columns)
    if format_name == "prompt_completion":
        question, answer = row.get("prompt"), row.get("completion")
    elif format_name == "alpaca":
        context = str(row.get("input") or "").strip()
        question = f"{row.get('instruction')}\n\n{context}" if context else row.get("instruction")
        answer = row.get("output")
    else:
        return row
    return {**row, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def group_column(rows: Sequence[dict], by: str | None) -> str | None:
    """The column to group scores by: `by` (which the rows must have; "none": no groups), else the first of
    GROUP_COLUMNS the rows have."""
    present = {key for row in rows for key in row}
    if by is not None:
        if by == "none":
            return None
        if by not in present:
            raise DataError(f"--by {by}: no row has a column {by!r} (columns: {', '.join(sorted(present))})")
        return by
    return next((name for name in GROUP_COLUMNS if name in present), None)


def evaluate_rows(model, tokenizer, rows: Sequence[dict], prompt_format: PromptFormat, *,
                  data_cfg: DataConfig | None = None, by: str | None = None, max_new_tokens: int = 64,
                  batch_size: int = 32) -> dict:
    """Score rows of any training format the way the run saw them.

    Each row is split into its prompt ids and reference answer by `prompt_format` (PromptFormat.split_media, the
    training renderers); the greedy answer is scored by exact match and contains. The loss is training's:
    `data_cfg` (columns, max_length, truncation, train_on_prompt; its format fields set from `prompt_format`)
    tokenizes the rows as the run did, and the mean over their trained tokens is taken. Text rows get the
    loss only. `by`: a row column whose values also get their own scores under "groups".

    Rows with images are read as training read them: with the model's modality adapter each `<image>` takes its
    soft-token positions in the prompt ids and in the loss's batches, and the adapter sees the row's images
    (relative paths from data.media_dir, else the rows' source folder); a row with images and a model without a
    modality adapter for them is an error naming the row (`check_media_rows`), never a text-only score.

    Returns {"n", "format", ["exact_match", "contains",] "loss", "perplexity", "tokens", ["by", "groups",]
    "questions", "predictions", "references"}.
    """
    if not rows:
        raise DataError("nothing to evaluate: the dataset has no rows")
    cfg = dataclasses.replace(data_cfg or DataConfig(), **dataclasses.asdict(prompt_format), skip_bad_rows=False,
                              drop_untrained=False)
    if cfg.truncation == "drop":  # every row must keep its example, so groups stay aligned
        cfg = dataclasses.replace(cfg, truncation="prompt")
    slots = modality_slots(model)
    check_media_rows(rows, cfg.columns, slots)
    examples, _ = tokenize_rows(rows, tokenizer, cfg, slots=slots)
    losses = example_losses(model, examples, pad_id_of(tokenizer), batch_size=batch_size)
    scored = {"questions": [], "predictions": [], "references": []}
    if prompt_format.format != "text":
        prompts = prompts_of(rows, tokenizer, prompt_format, cfg.columns, slots, media_folder(rows, cfg))
        scored = _generate_answers(model, tokenizer, rows, prompt_format, cfg.columns, prompts, max_new_tokens,
                                   batch_size)
    result = {"n": len(rows), "format": prompt_format.describe(tokenizer),
              **_scores(range(len(rows)), losses, scored)}
    column = group_column(rows, by)
    if column is not None:
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(str(row.get(column, "(none)")), []).append(index)
        result["by"] = column
        result["groups"] = {value: {"n": len(members), **_scores(members, losses, scored)}
                            for value, members in sorted(groups.items())}
    return {**result, **scored}


def check_media_rows(rows: Sequence[dict], columns: dict[str, str], slots: dict[str, MediaSlot]) -> None:
    """A DataError naming the first row that carries items (images) the model has no modality adapter for:
    scored without one, its placeholders would be plain text and its items unseen."""
    for index, row in enumerate(rows):
        row = apply_columns(row, columns)
        for modality in sorted({*KINDS, *slots} - set(slots)):
            column, items = row_items(row, modality)
            if items:
                count, them = (f"1 {modality}", "it") if len(items) == 1 else (f"{len(items)} {modality}s", "them")
                raise DataError(f"{place_of(rows, index)}: the row has {count} (field {column!r}), but the model "
                                f"has no {modality} adapter (method: modality) to read {them}, and "
                                f"scoring without one would take {placeholder(modality)} for plain text; evaluate "
                                "the modality run's adapter (--adapter RUN/adapter)")


def prompts_of(rows: Sequence[dict], tokenizer, prompt_format: PromptFormat, columns: dict[str, str],
               slots: dict[str, MediaSlot], folder: Path) -> list[tuple[list[int], str, list[MediaItem]]]:
    """(prompt ids, reference answer, items) of each row as training laid it out (PromptFormat.split_media): with a
    modality adapter's `slots` each item takes its soft-token positions and is decoded (relative paths from
    `folder`: data.tokenize.media_folder, training's rule)."""
    prompts = []
    for index, row in enumerate(rows):
        try:
            prompts.append(prompt_format.split_media(row, tokenizer, columns, slots, folder))
        except DataError as error:
            raise DataError(f"{place_of(rows, index)}: {error}") from None
    return prompts


def _generate_answers(model, tokenizer, rows, prompt_format: PromptFormat, columns,
                      prompts: list[tuple[list[int], str, list[MediaItem]]], max_new_tokens: int,
                      batch_size: int) -> dict[str, list[str]]:
    """The greedy answer to each row's prompt (`prompts_of`; its items read by the model's modality adapter), with
    its question and reference."""
    answers = greedy_answers(model, tokenizer, [ids for ids, _, _ in prompts], prompt_format, max_new_tokens,
                             batch_size, media=[items for _, _, items in prompts])
    questions = [_question(apply_columns(row, columns), prompt_format.format) for row in rows]
    return {"questions": questions, "predictions": answers, "references": [reference for _, reference, _ in prompts]}


def greedy_answers(model, tokenizer, prompts: Sequence[list[int]], prompt_format: PromptFormat, max_new_tokens: int,
                   batch_size: int = 32, media: Sequence[Sequence[MediaItem] | None] | None = None) -> list[str]:
    """The greedy answer to each prompt (token ids in `prompt_format`), ended by EOS or the format's end of turn;
    `media`: each prompt's items (`prompts_of`) for the model's modality adapter."""
    stops = stop_token_ids(tokenizer, model, [prompt_format])
    answers = greedy_ids(model, tokenizer, prompts, stops=stops, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         media=media)
    marker = prompt_format.end_of_turn(tokenizer)
    if marker:  # a text end-of-turn marker (not a special token) ends the answer where the model wrote it
        answers = [answer.split(marker)[0] for answer in answers]
    return answers


def _question(row: dict, format_name: str) -> str:
    """What a row asks, for showing examples."""
    if format_name == "chat":
        messages = row.get("messages") or row.get("conversations") or []  # lorakit's column or ShareGPT's
        users = [content_text(m.get("content", m.get("value")), "") for m in messages  # parts: <image> and text
                 if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human")]
        return str(users[-1]) if users else ""
    return str(row.get("instruction" if format_name == "alpaca" else "prompt", ""))


def _scores(members, losses: list[tuple[float, int]], scored: dict[str, list[str]]) -> dict:
    members = list(members)
    result: dict = {}
    if scored["predictions"]:
        result.update(accuracy([scored["predictions"][i] for i in members],
                               [scored["references"][i] for i in members]))
    return {**result, **loss_summary(sum(losses[i][0] for i in members), sum(losses[i][1] for i in members))}
