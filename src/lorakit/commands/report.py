"""`lorakit report RUN_DIR`: one self-contained HTML page (loss curves, evaluation, base vs tuned samples, data
statistics, spectra, parameters, config) that opens offline in any browser (analysis/html_report.py)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lorakit.errors import LorakitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit report`."""
    parser.epilog = ("examples:\n  lorakit report runs/my-run\n"
                     "  lorakit report runs/my-run --samples 0   # no model loaded\n")
    parser.add_argument("run_dir", type=Path, help="a run folder (lorakit train, quickstart or a sweep cell)")
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default: RUN_DIR/report.html)")
    parser.add_argument("--samples", type=int, default=3,
                        help="answer this many validation prompts with the base and the tuned model, greedily, "
                             "side by side (0: none, and no model is loaded)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length cap of each sample answer")
    parser.add_argument("--device", default=None, help="where the samples are generated (default: cuda, mps or cpu)")


def make_samples(args: argparse.Namespace) -> tuple[list[dict] | None, str]:
    """(rows of prompt, reference, base and tuned answers, or None; a line about them for the page)."""
    if args.samples == 0:
        return None, "No samples: --samples 0."
    from lorakit.analysis.samples import base_and_tuned
    from lorakit.commands.evaluate import run_data
    from lorakit.config import build_config, read_yaml
    from lorakit.data import load_rows
    from lorakit.data.rows import keep_places
    from lorakit.models import quiet_progress_bars
    from lorakit.run import CONFIG_FILE

    config = args.run_dir / CONFIG_FILE
    if not config.is_file():
        return None, f"No samples: the run folder has no {CONFIG_FILE}."
    cfg = build_config(read_yaml(config))
    if not (args.run_dir / cfg.method.output).is_dir():
        return None, f"No samples: the run has no {cfg.method.output}/ folder (it has not finished)."
    quiet_progress_bars()
    cfg = dataclasses.replace(cfg, data=run_data(args.run_dir, cfg, print))  # its files read from here
    train, validation = load_rows(cfg.data)
    rows, where = (validation, "validation") if len(validation) else (train, "training")
    print(f"samples: the first {min(args.samples, len(rows))} {where} rows, base and tuned ...")
    samples = base_and_tuned(args.run_dir, cfg, keep_places(list(rows[:args.samples]), rows),
                             max_new_tokens=args.max_new_tokens, device=args.device)
    if not samples:
        return None, "No samples: a text run continues text; it has no prompts to answer."
    why = "" if where == "validation" else " (the run has no validation rows)"
    with_images = sum(bool(sample.get("images")) for sample in samples)
    images = (f" {with_images} of them carry images: the tuned model read them through its image adapter; the base "
              "has no image adapter, so it answered the text alone (the <image> placeholder is text to it)."
              if with_images else "")
    return samples, (f"The first {len(samples)} {where} rows{why}, answered by the base model and the tuned one "
                     f"(greedy, at most {args.max_new_tokens} new tokens).{images}")


def run(args: argparse.Namespace) -> int:
    """Write the page and print its path."""
    from lorakit.analysis.html_report import render

    if not (args.run_dir / "metrics.jsonl").is_file():
        raise LorakitError(f"{args.run_dir} is not a run folder: it has no metrics.jsonl")
    if args.samples < 0 or args.max_new_tokens < 1:
        raise LorakitError("--samples must be 0 or more and --max-new-tokens 1 or more")
    try:
        samples, note = make_samples(args)
    except LorakitError as error:  # e.g. a hub model or dataset out of reach: the rest of the page needs neither
        raise LorakitError(f"{error} (--samples 0 writes the page without samples)") from None
    out = args.out or args.run_dir / "report.html"
    out.write_text(render(args.run_dir, samples, note), encoding="utf-8")
    print(f"report: {out}")
    return 0
