"""lorakit report: one self-contained HTML page per run, with the run's own numbers, laid out by a headless
Chromium without overflowing the window; and the compare page, whose long answers wrap and scroll in place."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
import torch
from train_fixtures import TEST_THREADS

import lorakit
from lorakit.analysis.html_report import render
from lorakit.cli import main
from lorakit.commands.compare import to_html
from lorakit.models import EMBEDDED_DATASETS

STEPS = 6
# a script added to a copy of a page (the pages have none): after layout it writes what a test checks into
# <body data-...>, which --dump-dom prints
PROBE = """<script>
const page = document.documentElement, outs = [...document.querySelectorAll('.out')];
const svg = document.querySelector('#loss-chart svg');
document.body.dataset.overflow = page.scrollWidth - window.innerWidth;
document.body.dataset.rightmost = Math.max(0, ...[...document.querySelectorAll('td, th')].map(c => c.getBoundingClientRect().right));
document.body.dataset.tallest = Math.max(0, ...outs.map(o => o.clientHeight));
document.body.dataset.scrolls = outs.filter(o => o.scrollHeight > o.clientHeight + 1).length;
document.body.dataset.chart = svg ? Math.round(svg.getBoundingClientRect().width) : 0;
</script>"""
WIDTH = 1200


def _install_chromium() -> str | None:
    """Debian's chromium, installed like scripts/setup.sh --test does when it is missing."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                   capture_output=True, timeout=600)
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium():
    path = _install_chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (needs root and apt-get)")
    return path


def laid_out(chromium: str, page: str, folder: Path) -> dict[str, float]:
    """What PROBE measured when Chromium laid `page` out in a WIDTH-pixel window."""
    path = folder / "probe.html"
    path.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},900",
                           "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=90)
    body = re.search(r"<body[^>]*>", done.stdout)
    assert body, done.stderr[-2000:]
    return {key: float(value) for key, value in re.findall(r'data-(\w+)="(-?[\d.]+)"', body.group(0))}


def _train(out: Path, name: str, *argv: str) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    try:
        assert main(["train", "--output_dir", str(out), "--name", name, "--train.max_steps", str(STEPS),
                     "--train.progress", "none", "--train.log_every", "1", "--data.limit", "48", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real LoRA run on the embedded model: 6 steps, an evaluation every 3 on 8 validation rows."""
    return _train(tmp_path_factory.mktemp("runs"), "tiny", "--data.val_limit", "8", "--train.eval_every", "3")


def section(page: str, anchor: str) -> str:
    found = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert found, f"no section {anchor}"
    return found.group(1)


def svg_texts(page: str) -> list[str]:
    chart = re.search(r'<figure id="loss-chart">(.*?)</figure>', page, re.S).group(1)
    return [unescape(t).strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", chart)]


def assert_self_contained(page: str) -> None:
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert all(link.startswith(("#", "data:")) for link in links), links  # nothing to fetch
    assert all(u.startswith("url(#") for u in re.findall(r"url\([^)]*\)", page)) and "@import" not in page
    assert "<script" not in page and "<canvas" not in page


@pytest.mark.timeout(300)
def test_report_of_a_real_run_shows_its_numbers(tiny_run, chromium, capsys):
    assert main(["report", str(tiny_run), "--samples", "2", "--max-new-tokens", "8"]) == 0
    page = (tiny_run / "report.html").read_text()
    assert_self_contained(page)
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tiny_run / "summary.json").read_text())
    # loss curves: the figure's axes carry tick labels and titles; the last train loss is on the page
    texts = svg_texts(page)
    assert {"optimizer step", "loss (mean per trained token)", "train", "eval"} <= set(texts)
    ticks = [float(t.replace("\u2212", "-")) for t in texts if re.fullmatch(r"\u2212?[\d.]+", t)]
    assert len(ticks) >= 6 and min(ticks) <= 1 and max(ticks) >= STEPS - 1
    last_loss = [r["loss"] for r in records if "loss" in r][-1]
    assert f"{last_loss:.4g}" in section(page, "loss")
    # evaluation: every eval record with its loss
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(f"{r['eval_loss']:.4g}" in section(page, "evaluation") for r in evals)
    # samples: the first two validation prompts, answered as `lorakit generate` answers them
    rows = [json.loads(line) for line in EMBEDDED_DATASETS["embedded-eval"].read_text().splitlines()[:2]]
    prompts = [row["prompt"] for row in rows]
    quiet = {"max_new_tokens": 8, "log": lambda line: None}
    tuned = lorakit.generate(prompts, adapter=tiny_run / "adapter", **quiet)
    base = lorakit.generate(prompts, model="embedded", **quiet)
    cells = [unescape(c) for c in re.findall(r'<div class="out">(.*?)</div>', section(page, "samples"), re.S)]
    assert cells == [x for i, row in enumerate(rows)
                     for x in (row["prompt"], row["completion"].strip(), base[i].strip(), tuned[i].strip())]
    # data: what tokenization recorded at training time
    stats = json.loads((tiny_run / "data_stats.json").read_text())
    assert stats["train"]["n_rows"] == 48 and stats["validation_examples"] == 8
    assert 0 < stats["train"]["n_trained_tokens"] < stats["train"]["n_tokens"]
    share = 100 * stats["train"]["n_trained_tokens"] / stats["train"]["n_tokens"]
    assert f"{stats['train']['n_tokens']:,}" in section(page, "data") and f"{share:.1f}%" in section(page, "data")
    # parameters and config
    assert f"{summary['trainable_params']:,} of {summary['total_params']:,}" in section(page, "parameters")
    assert "model.name_or_path" in section(page, "config") and "<details" in section(page, "config")
    assert "lorakit inspect" in section(page, "spectra")  # not inspected yet: the line names the command
    layout = laid_out(chromium, page, tiny_run)
    assert layout["overflow"] <= 0 and layout["rightmost"] <= WIDTH and layout["chart"] > 300


@pytest.mark.timeout(120)
def test_report_shows_the_spectra_once_inspected(tiny_run, capsys):
    assert main(["inspect", str(tiny_run)]) == 0
    table = json.loads((tiny_run / "spectra.json").read_text())
    page = render(tiny_run)
    spectra = section(page, "spectra")
    assert '<img alt="spectra" src="data:image/png;base64,' in spectra
    assert len(table["modules"]) == 28  # every linear layer of the embedded model's 4 blocks
    assert all(m["module"] in spectra for m in table["modules"])
    intruders = sum(m["intruders"] for m in table["modules"])
    assert f'<div class="k">intruder dimensions</div><div class="v">{intruders}</div>' in spectra
    assert "None made: <code>lorakit report" in section(page, "samples")  # render() alone makes no samples


@pytest.mark.timeout(300)
def test_a_run_without_validation_says_no_evaluation_was_recorded(tmp_path, capsys):
    run = _train(tmp_path, "no-eval", "data.val_source=null")
    assert main(["report", str(run), "--samples", "0"]) == 0
    page = (run / "report.html").read_text()
    evaluation = section(page, "evaluation")
    assert "No evaluation recorded" in evaluation and "data.val_fraction" in evaluation
    assert "No samples: --samples 0." in section(page, "samples")
    assert json.loads((run / "data_stats.json").read_text())["validation_examples"] == 0


@pytest.fixture
def hand_made_run(tmp_path):
    """A run folder as a crashed run leaves it (metrics, config), with a quickstart's predictions.jsonl."""
    folder = tmp_path / "my-run"
    folder.mkdir()
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 31)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text("model:\n  name_or_path: embedded\nmethod:\n  name: lora\n  r: 8\n")
    prediction = {"prompt": "Question: What is </script><b>bold</b>?", "reference": " Paris", "base": " is",
                  "tuned": " Paris"}
    (folder / "predictions.jsonl").write_text(json.dumps(prediction) + "\n")
    return folder


def test_page_is_self_contained_and_escaped(hand_made_run):
    page = render(hand_made_run)
    assert_self_contained(page)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "has not finished" in section(page, "parameters")  # no summary.json
    assert "Not recorded" in section(page, "data")
    assert f"{3.0 / 30:.4g}" in section(page, "loss")


def test_report_cli_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_compare_page_wraps_a_long_repeated_output(chromium, tmp_path):
    runaway = "the the the " * 400 + "x" * 3000  # words, then one 3,000-character token
    page = to_html(["What is the capital of Peru?", "Name a colour."],
                   {"base": [runaway, "blue"], "tuned": [" Lima", "red"], "other": ["Lima", runaway]})
    assert_self_contained(page)
    layout = laid_out(chromium, page, tmp_path)
    assert layout["overflow"] <= 0 and layout["rightmost"] <= WIDTH  # the next column stays on screen
    assert layout["scrolls"] == 2 and layout["tallest"] <= 14 * 16  # capped at 14rem, scrolling inside
