"""`lorakit evaluate` and `lorakit report` on a `method: modality` run read the rows' images as training did: the
prompt ids with the soft-token slots are training's, the greedy answers are `generate_texts(..., images=...)`'s, the
loss is training's on the collated batch (images in), relative paths resolve from data.media_dir or the data file's
folder from any working folder; images and a model without an image adapter are one error line."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from _tol import TINY, approx
from test_modality_cli import ANSWERS, COLOURS, METHOD, QUESTION, _draw

import lorakit
from lorakit.adapters import apply, save_adapter
from lorakit.adapters.modality import modality_slots
from lorakit.analysis.samples import base_and_tuned
from lorakit.cli import main
from lorakit.config import build_config, read_yaml
from lorakit.data import DataConfig, load_rows, tokenize_rows
from lorakit.data.batching import collate_padded
from lorakit.data.prompting import read_record
from lorakit.data.rows import keep_places
from lorakit.infer.evaluate import evaluate_rows, prompts_of
from lorakit.infer.generate import generate_texts
from lorakit.infer.metrics import accuracy
from lorakit.labels import IGNORE_INDEX
from lorakit.models import load_model
from lorakit.run import pad_id_of
from lorakit.train.precision import PRECISIONS
from lorakit.train.step import evaluate as training_eval_loss
from lorakit.train.step import make_loss_sum

pytestmark = pytest.mark.timeout(300)
TEXT_ROW = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris"}], "kind": "text"}


def _row(index: int, image: str, parts: bool) -> dict:
    name = list(COLOURS)[index % 4]
    user = [{"type": "image"}, {"type": "text", "text": QUESTION}] if parts else f"<image>\n{QUESTION}"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ANSWERS[name]}],
            "images": [image], "kind": "image"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A modality run started in its folder with relative paths: rows.jsonl and val.jsonl name images in pics/
    (data.media_dir: pics); val2.jsonl names the same validation images relative to its own folder."""
    work = tmp_path_factory.mktemp("flags")
    (work / "pics").mkdir()
    for index in range(20):
        _draw(work / "pics" / f"{index}.png", COLOURS[list(COLOURS)[index % 4]], index)
    train = [_row(index, f"{index}.png", index % 2 == 1) for index in range(16)]
    val = [_row(index, f"{index}.png", index % 2 == 0) for index in range(16, 20)]
    val = [val[0], val[1], TEXT_ROW, val[2], val[3]]
    for name, rows in (("rows", train), ("val", val),
                       ("val2", [{**row, "images": [f"pics/{row['images'][0]}"]} if "images" in row else row
                                 for row in val])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (work / "modality.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "embedded"}, "method": METHOD, "output_dir": "runs",
        "data": {"source": "rows.jsonl", "val_source": "val.jsonl", "media_dir": "pics", "max_length": 64},
        "train": {"lr": 3e-3, "epochs": 8, "micro_batch_size": 8, "precision": "fp32", "progress": "none"}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        result = lorakit.finetune(Path("modality.yaml"), name="flags", log=lambda line: None)
    return work, dataclasses.replace(result, output=work / result.output)  # its folders are relative to `work`


def _val_rows(work: Path) -> tuple[list[dict], DataConfig]:
    cfg = DataConfig(source=str(work / "val.jsonl"), media_dir=str(work / "pics"), max_length=64)
    return load_rows(cfg)[0], cfg


def test_prompt_ids_and_images_are_trainings(run):
    work, result = run
    rows, cfg = _val_rows(work)
    slots = modality_slots(result.model)
    examples, _ = tokenize_rows(rows, result.tokenizer, cfg, slots=slots)
    prompts = prompts_of(rows, result.tokenizer, read_record(result.output).prompt, {}, slots, work / "pics")
    for example, (ids, reference, items) in zip(examples, prompts):
        answer_start = next(t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        assert ids == example["input_ids"][:answer_start]
        assert [(m, start) for m, start, _ in items] == [(m, start) for m, start, _ in example.get("media", [])]
        assert all((a[2] == b[2]).all() for a, b in zip(items, example.get("media", [])))
    assert [len(items) for _, _, items in prompts] == [1, 1, 0, 1, 1]
    assert [reference for _, reference, _ in prompts] == ["Japan", "Ireland", "Paris", "Greece", "Sweden"]


def _cli_json(args: list[str], capsys) -> dict:
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_evaluate_reads_the_images_from_any_folder(run, tmp_path, monkeypatch, capsys):
    work, result = run
    monkeypatch.chdir(tmp_path)  # relative data and media paths resolve from where the run was started
    scored = _cli_json(["evaluate", str(work / "runs" / "flags"), "--json"], capsys)
    record = read_record(result.output)
    rows = [json.loads(line) for line in (work / "val.jsonl").read_text().splitlines()]
    questions = [QUESTION if "images" in row else row["messages"][0]["content"] for row in rows]
    images = [[str(work / "pics" / row["images"][0])] if "images" in row else [] for row in rows]
    answers = generate_texts(result.model, result.tokenizer, questions, prompt_format=record.prompt,
                             max_new_tokens=64, images=images)
    references = [row["messages"][1]["content"] for row in rows]
    pictured = [i for i, row in enumerate(rows) if "images" in row]
    expected = accuracy([answers[i] for i in pictured], [references[i] for i in pictured])
    assert scored["groups"]["image"]["exact_match"] == expected["exact_match"]
    assert len({answers[i] for i in pictured}) > 1  # the answers depend on the image
    assert scored["groups"]["image"]["contains"] == expected["contains"]
    assert scored["exact_match"] == accuracy(answers, references)["exact_match"]
    blind = generate_texts(result.model, result.tokenizer, [f"<image>\n{QUESTION}"], prompt_format=record.prompt,
                           max_new_tokens=64)[0]  # the placeholder as text, no image: what a silent failure answers
    assert any(answers[i] != blind for i in pictured)
    rows, cfg = _val_rows(work)
    assert evaluate_rows(result.model, result.tokenizer, rows, record.prompt, data_cfg=cfg)["predictions"] == answers
    # the same rows with paths relative to their file's folder, through --adapter and --data
    again = _cli_json(["evaluate", "--adapter", str(result.output), "--data", str(work / "val2.jsonl"), "--json"],
                      capsys)
    assert {key: again[key] for key in ("exact_match", "contains", "tokens")} == \
        {key: scored[key] for key in ("exact_match", "contains", "tokens")}
    assert again["loss"] == approx(scored["loss"], reduction=TINY)


def test_evaluate_loss_is_the_training_loss_with_the_images(run):
    work, result = run
    rows, given = _val_rows(work)
    run_cfg = build_config(read_yaml(work / "runs" / "flags" / "config.yaml"))
    cfg = dataclasses.replace(run_cfg.data, source=given.source, val_source=None, media_dir=given.media_dir)
    examples, _ = tokenize_rows(rows, result.tokenizer, cfg, slots=run_cfg.method.media_slots())
    batch = collate_padded(examples, pad_id_of(result.tokenizer))  # the batch training makes of the rows
    model_loss = make_loss_sum(result.model.eval(), torch.device("cpu"), PRECISIONS["fp32"])
    reference = training_eval_loss(model_loss, [batch])
    scored = evaluate_rows(result.model, result.tokenizer, rows, read_record(result.output).prompt, data_cfg=cfg)
    assert scored["loss"] == approx(reference, reduction=TINY)
    assert scored["tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
    assert reference == approx(result.summary.final_eval_loss, reduction=TINY)  # the run's own last eval loss
    text_only, _ = tokenize_rows(rows, result.tokenizer, cfg)  # <image> as text, no soft tokens
    blind = training_eval_loss(model_loss, [collate_padded(text_only, pad_id_of(result.tokenizer))])
    assert abs(blind - reference) > 0.1


def test_images_without_an_image_adapter_are_one_error_line(run, tmp_path, capsys):
    work, _ = run
    source = work / "val.jsonl"
    line = (f"error: {source} line 1: the row has 1 image (field 'images'), but the model has no image adapter "
            "(method: modality) to read it, and scoring without one would take <image> for plain text; evaluate "
            "the modality run's adapter (--adapter RUN/adapter)\n")
    assert main(["evaluate", "--model", "embedded", "--data", str(source)]) == 2
    assert capsys.readouterr().err.endswith(line)
    lora = tmp_path / "lora"
    save_adapter(apply(load_model("embedded"), lorakit.LoRA(r=2)), lora, "embedded")
    assert main(["evaluate", "--adapter", str(lora), "--data", str(source)]) == 2
    assert capsys.readouterr().err.endswith(line)


def test_report_samples_show_the_tuned_answers_with_images(run, tmp_path, monkeypatch):
    work, result = run
    monkeypatch.chdir(tmp_path)
    run_dir = work / "runs" / "flags"
    assert main(["report", str(run_dir), "--samples", "2", "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "2 of them carry images: the tuned model read them through its image adapter; the base has no image " \
           "adapter, so it answered the text alone (the &lt;image&gt; placeholder is text to it)." in page
    images = [[str(work / "pics" / f"{index}.png")] for index in (16, 17)]  # the first two validation rows'
    tuned = generate_texts(result.model, result.tokenizer, [QUESTION] * 2, max_new_tokens=32, images=images,
                           prompt_format=read_record(result.output).prompt)
    run_cfg = build_config(read_yaml(run_dir / "config.yaml"))
    rows, cfg = _val_rows(work)
    samples = base_and_tuned(run_dir, dataclasses.replace(run_cfg, data=cfg), keep_places(list(rows[:2]), rows),
                             log=lambda line: None)
    assert [sample["tuned"] for sample in samples] == [answer.strip() for answer in tuned]
    assert [sample["images"] for sample in samples] == [1, 1]
    assert all(sample["tuned"] and sample["tuned"] in page and "<image>" in sample["prompt"] for sample in samples)
