"""`lorakit lab-report`: run the lab experiments on the embedded model and write docs/lab.md.

    lorakit lab-report --out docs --work runs/lab          # (a)-(f): resumable, see the README for its length
    lorakit lab-report --out docs --work runs/lab --all    # and (g) and (h) (lab-rl's, lab-vision's): the whole page
    lorakit lab-report --quick --out /tmp/lab --work /tmp/lab-work   # the same pipeline on tiny settings

Trains the runs of `lorakit.lab.experiments` that are not complete (skipping finished ones), writes
WORK/results.json, then docs/lab.md and its figures (`lorakit.lab.page`). Section (g) comes from lab-rl's
WORK/rl/results.json and section (h) from lab-vision's WORK/vision/results.json whenever they exist (`--rl`,
`--vision` or `--all` run or resume those experiments first); other lettered sections already in OUT/lab.md are kept.
"""
from __future__ import annotations

import argparse
import json

from lorakit.commands.labargs import add_lab_arguments, start_lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit lab-report`."""
    add_lab_arguments(parser, "folder for lab.md and its figures",
                      "folder of the lab's run folders (WORK/quick with --quick); lab-rl's are in WORK/rl",
                      "tiny settings (fewer rows, epochs, seeds and grid points): the pipeline in a minute")
    parser.add_argument("--rl", action="store_true",
                        help="also run (or resume) lab-rl's experiment (WORK/rl, WORK/rl-quick with --quick) for (g)")
    parser.add_argument("--vision", action="store_true",
                        help="also run (or resume) lab-vision's experiment (WORK/vision, WORK/vision-quick) for (h)")
    parser.add_argument("--all", action="store_true", help="--rl and --vision: every section of the page")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at a time, each in its own process on one thread (e.g. 2 on two cores)")


def run(args: argparse.Namespace) -> int:
    """Train what is missing, then write the page."""
    from lorakit.lab import experiments, rl, vision
    from lorakit.lab.page import write_lab
    from lorakit.lab.vision_page import write_vision_section

    start_lab(args)
    work = args.work / "quick" if args.quick else args.work
    results = experiments.run_lab(work, experiments.QUICK if args.quick else experiments.FULL,
                                  workers=args.workers)
    rl_work = args.work / ("rl-quick" if args.quick else "rl")
    if args.rl or args.all:
        rl.run_rl(rl_work, rl.QUICK if args.quick else rl.FULL)
    rl_file = rl_work / rl.RESULTS_FILE
    rl_results = json.loads(rl_file.read_text()) if rl_file.is_file() else None
    vision_work = args.work / ("vision-quick" if args.quick else "vision")
    if args.vision or args.all:
        vision.run_vision(vision_work, vision.QUICK if args.quick else vision.FULL)
    print(f"lab: {work / experiments.RESULTS_FILE}; {results['budget']['distinct']} runs")
    page = write_lab(results, work, args.out, rl_results)
    vision_file = vision_work / vision.RESULTS_FILE
    if vision_file.is_file():
        write_vision_section(page, json.loads(vision_file.read_text()))
    print(f"lab: {page}")
    return 0
