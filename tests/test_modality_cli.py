"""Image rows in users' conventions (data/media.py), then `method: modality` end to end on the embedded model: a few
training steps on PNGs drawn here (loss falls), the saved adapter read back by `lorakit generate --image` (the
in-memory model's greedy tokens) and by `lorakit serve` through the official openai client (an image_url data URL:
the same tokens; a text request in the same batch: the base's)."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml
from PIL import Image

import lorakit
from lorakit.cli import main
from lorakit.data import DataConfig, load_rows, preview_example, tokenize_rows
from lorakit.data.batching import collate_packed, collate_padded
from lorakit.data.prompting import read_record
from lorakit.errors import DataError
from lorakit.infer.generate import generate_texts
from lorakit.labels import IGNORE_INDEX
from lorakit.media import MediaSlot, positions_key, values_key
from lorakit.models import load_model, load_tokenizer

pytestmark = pytest.mark.timeout(300)
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 210, 30)}
SLOT = MediaSlot(4, (3, 16, 16))
QUESTION = "Which country's flag has this colour?"
ANSWERS = {"red": "Japan", "green": "Ireland", "blue": "Greece", "yellow": "Sweden"}  # names the embedded model knows
METHOD = {"name": "modality", "modalities": {"image": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1,
                                                       "heads": 2, "num_tokens": 4, "r": 4}}}


def _draw(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    """A flat colour with a darker square somewhere and pixel noise."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((24, 24, 3), np.int64) + np.array(colour)
    corner = rng.integers(0, 14, 2)
    pixels[corner[0]:corner[0] + 8, corner[1]:corner[1] + 8] //= 2
    pixels += rng.integers(-15, 16, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """16 training images and their rows: half chat rows with content parts, half `<image>` in plain text."""
    work = tmp_path_factory.mktemp("images")
    rows = []
    for index in range(16):
        name = list(COLOURS)[index % 4]
        _draw(work / f"{index}.png", COLOURS[name], index)
        if index % 2:
            user = [{"type": "image"}, {"type": "text", "text": QUESTION}]
            rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ANSWERS[name]}],
                         "images": [f"{index}.png"]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"<image>\n{QUESTION}"},
                                      {"role": "assistant", "content": ANSWERS[name]}], "image": f"{index}.png"})
    (work / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return work


def test_rows_with_images_become_slots_batches_and_a_preview(folder):
    tokenizer = load_tokenizer("embedded")
    cfg = DataConfig(source=str(folder / "rows.jsonl"))
    rows, _ = load_rows(cfg)
    examples, stats = tokenize_rows(rows, tokenizer, cfg, slots={"image": SLOT})
    assert stats.n_examples == 16
    for example, index in zip(examples, (0, 1)):
        [(modality, start, pixels)] = example["media"]
        assert modality == "image" and pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
        assert example["input_ids"][start:start + 4] == [tokenizer.eos_token_id] * 4
        assert example["labels"][start:start + 4] == [IGNORE_INDEX] * 4
        expected = np.asarray(Image.open(folder / f"{index}.png").convert("RGB").resize((16, 16), Image.BILINEAR))
        assert np.array_equal(pixels, expected.transpose(2, 0, 1))
    prompts = [ex["input_ids"][:next(t for t, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)]
               for ex in examples[:2]]
    assert prompts[0] == prompts[1]  # content parts [image, text] render as "<image>\n" + text
    assert "<image:4 soft tokens>\nWhich country's flag" in preview_example(examples[0], tokenizer, {"image": SLOT})
    batch = collate_padded([examples[0], {"input_ids": [5, 6], "labels": [5, 6]}], pad_id=1)
    assert batch[values_key("image")].shape == (2, 1, 3, 16, 16)
    assert batch[positions_key("image")].tolist() == [[examples[0]["media"][0][1]], [-1]]
    with pytest.raises(DataError, match="examples with images cannot be packed"):
        collate_packed([[examples[0]]], pad_id=1)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "<image> colour?", "completion": "red", "images": ["nope.png"]},
     "line 1: field 'images'[0]: file 'nope.png' not found (read from {folder})"),
    ({"prompt": "<image> colour?", "completion": "red", "image": "bad.png"},
     "line 1: field 'image'[0]: cannot decode 'bad.png' as an image (UnidentifiedImageError)"),
    ({"prompt": "<image> and <image>?", "completion": "red", "images": ["0.png"]},
     "line 1: the text has 2 <image> placeholders but field 'images' holds 1 image"),
    ({"prompt": "colour?", "completion": "red", "images": ["0.png"]},
     "line 1: the text has 0 <image> placeholders but field 'images' holds 1 image"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "red"}]},
     "line 1: messages[0] part 0 must be {\"type\": \"text\", \"text\": STRING} or {\"type\": \"image\"}, got "
     "{'type': 'video'}"),
])
def test_row_errors_name_the_row_and_the_field(folder, tmp_path, row, message):
    (folder / "bad.png").write_bytes(b"not a png")
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps(row) + "\n")
    cfg = DataConfig(source=str(source), media_dir=str(folder))
    with pytest.raises(DataError) as error:
        tokenize_rows(load_rows(cfg)[0], load_tokenizer("embedded"), cfg, slots={"image": SLOT})
    assert str(error.value) == f"{source} " + message.replace("{folder}", str(folder))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(folder):
    """`method: modality` on the embedded model through the config file `lorakit train` reads."""
    config = folder / "modality.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "embedded"}, "method": METHOD, "output_dir": str(folder / "runs"),
        "data": {"source": str(folder / "rows.jsonl"), "max_length": 64},
        "train": {"lr": 3e-3, "epochs": 8, "micro_batch_size": 8, "precision": "fp32", "progress": "none"}}))
    return lorakit.finetune(config, name="colours", log=lambda line: None)


def test_training_lowers_the_loss_and_generate_reads_the_saved_adapter(trained, folder, capsys):
    losses = [record["loss"] for record in trained.metrics if "loss" in record]
    assert len(losses) == 16 and max(losses[-3:]) < 0.3 * losses[0]
    image = str(folder / "3.png")
    record = read_record(trained.output)
    expected = generate_texts(trained.model, trained.tokenizer, [QUESTION], prompt_format=record.prompt,
                              max_new_tokens=6, images=[[image]])[0]
    assert main(["generate", "--adapter", str(trained.output), "--image", image, "--max-new-tokens", "6",
                 QUESTION]) == 0
    printed = capsys.readouterr().out.split(f"### prompt 1: {QUESTION}\n", 1)[1]
    assert expected and printed == expected + "\n\n"
    assert main(["generate", "--adapter", str(trained.output), "--image", image, "--image", image, QUESTION + " <image>"]) == 2
    assert "the prompt has 1 <image> placeholders but 2 images were given" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(trained):
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main())", "serve",
               "--port", str(port), "--batch-window-ms", "300", "--adapter", f"vision={trained.output}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/models").status_code == 200:
                break
        except httpx.TransportError:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_serve_routes_image_url_parts_to_the_modality_adapter(server, trained, folder):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="-")
    assert [m.id for m in client.models.list()] == ["base", "vision"]
    image = folder / "5.png"
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    record = read_record(trained.output)
    seen = generate_texts(trained.model, trained.tokenizer, [QUESTION], prompt_format=record.prompt, max_new_tokens=6,
                          images=[[str(image)]])[0]
    base, tokenizer = load_model("embedded").eval(), load_tokenizer("embedded")
    plain = generate_texts(base, tokenizer, [QUESTION], chat=True, max_new_tokens=6)[0]

    def ask(model: str, content) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              max_tokens=6, temperature=0).choices[0].message.content

    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    with ThreadPoolExecutor(2) as pool:  # in one batch: the text row must see the base only
        answers = list(pool.map(ask, ["vision", "base"], [parts, QUESTION]))
    assert answers == [seen, plain] and seen != plain
    with pytest.raises(openai.BadRequestError) as error:
        ask("vision", [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
    assert error.value.param == "messages[0].content[0].image_url" and "only data URLs" in error.value.message
