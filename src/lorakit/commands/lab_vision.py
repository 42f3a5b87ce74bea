"""`lorakit lab-vision`: the lab's multimodal experiment (per-modality adapters on the frozen LM, the embedded
world's flags) and docs/lab.md's section (h).

    lorakit lab-vision --out docs --work runs/lab          # resumable; writes runs/lab/vision/results.json
    lorakit lab-vision --quick --out /tmp/lab --work /tmp/lab-work   # the same pipeline on tiny settings (seconds)

Trains the frozen LM, each arm's lr search and its seeded runs (`lorakit.lab.vision`, skipping completed runs),
writes results.json, then puts section (h), its figure and a copy of the results into OUT (`lorakit.lab.vision_page`).
"""
from __future__ import annotations

import argparse

from lorakit.commands.labargs import add_lab_arguments, start_lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit lab-vision`."""
    add_lab_arguments(parser, "folder of lab.md (section (h) and its figure)",
                      "the lab's work folder; the runs go to WORK/vision (WORK/vision-quick with --quick)",
                      "tiny settings: the pipeline end to end in seconds")


def run(args: argparse.Namespace) -> int:
    """Run what is missing, write results.json and the page section."""
    from lorakit.lab.vision import FULL, QUICK, RESULTS_FILE, run_vision
    from lorakit.lab.vision_page import LORA_BUYS, write_vision_section

    start_lab(args)
    work = args.work / ("vision-quick" if args.quick else "vision")
    results = run_vision(work, QUICK if args.quick else FULL)
    buys = LORA_BUYS.verdict(tuple(results["differences"]["routed_minus_projector_composed"]["interval"]))
    print(f"lab-vision: {work / RESULTS_FILE}; text unchanged: {'yes' if results['routed_text_equal'] else 'NO'}; "
          f"per-modality LoRA buys composed accuracy: {buys}")
    print(f"lab-vision: {write_vision_section(args.out / 'lab.md', results)}")
    return 0
