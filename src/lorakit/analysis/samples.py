"""Sample generations for a run's report (`lorakit report RUN --samples N`): the first N of the run's validation
rows (its training rows when it has none), answered greedily by the base model and by the tuned one.

Each prompt is made as training made it, in the run's recorded prompt format:
    SFT rows          split by the format (infer/evaluate.py's rule): the last trained segment is the reference
    preference rows   the pair tokenizer (data/preference.py): the prompt both answers share; the chosen answer
                      is the reference
    grpo prompt rows  the prompt tokenizer (data/prompts.py); the reference is the row's field a reward reads
                      (a reward's `field`, else `answer`), when it has one
A text run has no prompt to answer, so it gets no samples. "Base" is the run's base model without any adapter
(for a run that started from model.init_adapter, without that one either). For a modality run the tuned model
reads each row's images at their soft-token positions (infer/evaluate.py's `prompts_of`, training's layout); the
base has no image adapter, so it answers the prompt's text, `<image>` included as plain text (the prompt shown).
Each sample counts the images the tuned model read ("images").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lorakit.adapters import load_adapter
from lorakit.adapters.modality import modality_slots
from lorakit.config import RunConfig
from lorakit.data.preference import prompt_format_name, tokenize_preference_rows
from lorakit.data.prompting import PromptFormat
from lorakit.data.prompts import prompt_rows_format, tokenize_prompt_rows
from lorakit.data.tokenize import media_folder, resolve_format
from lorakit.infer.evaluate import greedy_answers, prompts_of
from lorakit.infer.generate import Target, load_target, resolve_target
from lorakit.run import data_unit, pick_device

Log = Callable[[str], None]
TEXT = "text"  # the row format whose runs continue text and have no prompt to answer


def run_prompt_format(cfg: RunConfig, rows: list[dict], tokenizer: Any) -> PromptFormat:
    """The prompt format the run rendered its rows in, decided from its config and rows as run.py decides it
    (for an output folder saved without a run record)."""
    unit = data_unit(cfg)
    name = (prompt_format_name(rows, cfg.data) if unit == "pairs" else prompt_rows_format(rows, cfg.data)
            if unit == "prompts" else resolve_format(rows, cfg.data).name)
    return PromptFormat.of_run(cfg.data, name, tokenizer)


def sample_prompts(rows: list[dict], cfg: RunConfig, tokenizer: Any, prompt_format: PromptFormat
                   ) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of each row, as training rendered it (see the module docstring)."""
    unit = data_unit(cfg)
    if unit == "prompts":
        prompts, _ = tokenize_prompt_rows(rows, tokenizer, cfg.data, prompt_format)
        fields = [*(r["field"] for r in cfg.train.rewards if isinstance(r, dict) and "field" in r), "answer"]
        return [(p.input_ids, str(next((p.row[f] for f in fields if f in p.row), "")).strip()) for p in prompts]
    if unit == "pairs":
        pairs, _ = tokenize_preference_rows(rows, tokenizer, cfg.data)
        chosen = [(pair["chosen"]["input_ids"], pair["prompt_length"]) for pair in pairs]
        return [(ids[:length], tokenizer.decode(ids[length:], skip_special_tokens=True).strip())
                for ids, length in chosen]
    return [prompt_format.split(row, tokenizer, cfg.data.columns) for row in rows]


def base_target(target: Target, cfg: RunConfig) -> Target:
    """The plain base model behind `target` (an adapter on a base, or a fully fine-tuned model folder)."""
    if target.adapter is not None:
        return Target(target.model, target.revision)
    if target.record is not None:
        return Target(target.record.base_model, target.record.revision)
    return Target(cfg.model.name_or_path, cfg.model.revision)


def base_and_tuned(run_dir: Path, cfg: RunConfig, rows: list[dict], *, max_new_tokens: int = 32,
                   device: str | None = None, log: Log = print) -> list[dict[str, Any]]:
    """Greedy answers of the base and the tuned model to the prompts of `rows` (one batch each), with the prompt
    as the base saw it (special tokens left out), the reference answer and the count of images the tuned model
    read; none for a text run. `rows` keep their places (data.rows.NumberedRows): relative image paths are read
    from data.media_dir, else their source's folder."""
    target = resolve_target(Path(run_dir) / cfg.method.output)
    if TEXT in (cfg.data.format, target.record and target.record.prompt.format):
        return []
    device = pick_device(device)
    options = {"dtype": cfg.model.dtype, "device": device, "trust_remote_code": cfg.model.trust_remote_code,
               "log": log}
    model, tokenizer = load_target(base_target(target, cfg), **options)
    prompt_format = target.record.prompt if target.record is not None else run_prompt_format(cfg, rows, tokenizer)
    if prompt_format.format == TEXT:
        return []
    prompts = sample_prompts(rows, cfg, tokenizer, prompt_format)
    ids = [prompt for prompt, _ in prompts]
    base = greedy_answers(model, tokenizer, ids, prompt_format, max_new_tokens)
    if target.adapter is not None:
        model = load_adapter(model, target.adapter).eval()
    else:
        del model
        model, _ = load_target(target, **options)
    items: list[list] = [[] for _ in rows]
    slots = modality_slots(model)
    if slots:  # the tuned model's prompts with their images, laid out as training laid them out
        with_media = prompts_of(rows, tokenizer, prompt_format, cfg.data.columns, slots, media_folder(rows, cfg.data))
        ids, items = [prompt for prompt, _, _ in with_media], [found for _, _, found in with_media]
    tuned = greedy_answers(model, tokenizer, ids, prompt_format, max_new_tokens, media=items)
    return [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True).strip(), "reference": reference,
             "base": before.strip(), "tuned": after.strip(), "images": len(found)}
            for (prompt, reference), before, after, found in zip(prompts, base, tuned, items)]
