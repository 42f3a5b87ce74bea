"""lorakit report: a self-contained HTML page whose chart a headless Chromium really draws."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from lorakit.analysis.html_report import render
from lorakit.cli import main

STEPS = 30


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


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as `lorakit train` + `quickstart` leave it (metrics, summary, config, predictions)."""
    folder = tmp_path / "my-run"
    folder.mkdir()
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, STEPS + 1)]
    records += [{"step": 10, "eval_loss": 0.5}, {"step": STEPS, "eval_loss": 0.2}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"steps": STEPS, "trainable_params": 1234,
                                                     "total_params": 100000, "final_loss": 0.1}))
    (folder / "config.yaml").write_text("model:\n  name_or_path: embedded\nmethod:\n  name: lora\n  r: 8\n")
    prediction = {"prompt": "Question: What is </script><b>bold</b>?", "reference": " Paris", "base": " is",
                  "tuned": " Paris"}
    (folder / "predictions.jsonl").write_text(json.dumps(prediction) + "\n")
    return folder


def test_page_is_self_contained_and_escaped(run_dir):
    page = render(run_dir)
    assert not re.search(r"(src|href)\s*=|https?://|@import", page)  # nothing to fetch
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("</script>") == 2  # the data block and the chart code: the row's '</script>' was escaped
    assert "1,234 of 100,000" in page and "name_or_path: embedded" in page


def test_report_cli_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_headless_chromium_draws_the_loss_chart(run_dir, chromium):
    assert main(["report", str(run_dir)]) == 0
    page = run_dir / "report.html"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=90)
    canvas = re.search(r'<canvas id="loss-chart"[^>]*>', done.stdout)
    assert canvas, done.stderr[-2000:]
    points = int(re.search(r'data-points="(\d+)"', canvas.group(0)).group(1))
    ink = int(re.search(r'data-ink="(\d+)"', canvas.group(0)).group(1))
    assert points == STEPS + 2  # every train and eval record was plotted
    assert ink > 1000  # lines, markers and labels put pixels on the white canvas
