"""(h) Images on a frozen LM: a per-modality adapter (the Phi-4-multimodal pattern) on the embedded world's flags.

Phi-4-multimodal keeps its language model frozen and gives each new input type an encoder, a projector and a LoRA
of its own, switched on only for inputs of that type, so a modality never changes text behaviour. This experiment
does that on the embedded model:

    LM       the embedded model fully fine-tuned on the quickstart's questions (`lm_start`), then frozen: it
             answers text questions, held-out countries included (it read their facts in pre-training)
    images   procedural flags of 38 countries (lab/flags.py), each rendering at a random size, position, colour
             jitter and noise; "Which country's flag is this?" for every country, and the composed questions
             ("What is the capital of the country whose flag this is?", and the continent) for ~70% of them; the
             other ~30% never get a composed question in training: answering one needs what the LM knew
    arms     routed          encoder + projector + a LoRA active only on rows with an image (`method: modality`)
             projector-only  encoder + projector, no LoRA (r 0): what the soft tokens alone reach
             shared          encoder + projector + a LoRA on every row (`lora_rows: all`): one LoRA for text and
                             images, as a non-routed adapter would be
    lr       each arm's lr from a search on the 2x lattice (evidence.LRSearch) at seed SWEEP_SEED, scored on
             *validation* renderings (flag question, and composed questions of the composed-train countries only,
             so the held-out countries never choose an lr)
    report   each arm at its lr for every seed of `seeds`, on *test* renderings: flag accuracy, composed accuracy
             on held-out countries and on trained ones, and text accuracy on the held-out text questions; 95%
             bootstrap intervals over questions and seeds (evidence.bootstrap_accuracy)

Every run is cached in its own folder with a scores.json, so a killed experiment resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lorakit.adapters import METHODS
from lorakit.adapters.config import Modality, ModalitySpec
from lorakit.analysis.sweep import Cell, run_cell
from lorakit.config import load_config
from lorakit.infer.evaluate import evaluate
from lorakit.infer.generate import generate_texts
from lorakit.infer.metrics import exact_match
from lorakit.lab import evidence
from lorakit.lab.datasets import read_jsonl, write_jsonl
from lorakit.lab.facts import country
from lorakit.lab.flags import COMPOSED, FLAGS, build_flag_rows, split_flags
from lorakit.models import EMBEDDED_DATASETS
from lorakit.run import run_training

Log = Callable[[str], None]
RESULTS_FILE = "results.json"
SCORES_FILE = "scores.json"
SWEEP_SEED = 0
LM_LR = 1e-4  # full fine-tuning of the frozen LM-to-be (the quickstart's questions and schedule otherwise)
ARMS: dict[str, dict] = {
    "routed": {"lora_rows": "modality"},
    "projector-only": {"r": 0},
    "shared": {"lora_rows": "all"},
}
MEASURES = ("flag", "composed", "composed_seen", "text")  # test sets, in the page's order


@dataclass(frozen=True)
class VisionSettings:
    """How big the experiment is: FULL for docs/lab.md, QUICK for the test (seconds)."""

    lm_steps: int  # full fine-tuning steps of the LM before it is frozen
    steps: int  # optimizer steps of each arm's run
    micro_batch: int
    coarse: tuple[int, ...]  # lr lattice exponents of the coarse grid (lr = 1e-3 * 2**k)
    seeds: tuple[int, ...]  # the reported runs' seeds
    train_renderings: int  # training renderings per country
    eval_renderings: int  # validation and test renderings per country (each)
    image_size: int
    patch_size: int
    num_tokens: int
    r: int  # the modality LoRA's rank (routed and shared arms)
    cap: int = 7  # most lattice points an arm's lr search may run
    bootstrap: int = 2000
    text_questions: int | None = None  # None: all held-out text questions


FULL = VisionSettings(lm_steps=228, steps=400, micro_batch=16, coarse=(-2, 0, 2), seeds=(1, 2, 3),
                      train_renderings=24, eval_renderings=4, image_size=32, patch_size=8, num_tokens=16, r=8)
QUICK = VisionSettings(lm_steps=3, steps=2, micro_batch=4, coarse=(0,), seeds=(1, 2), train_renderings=1,
                       eval_renderings=1, image_size=16, patch_size=8, num_tokens=4, r=2, cap=3, bootstrap=100,
                       text_questions=6)


def question_id(row: dict) -> str:
    """A test question: its image (or country) and kind."""
    return f"{row['images'][0] if 'images' in row else row['country']}/{row['kind']}"


def lm_start(work: Path, settings: VisionSettings, text_rows: list[dict], log: Log) -> tuple[dict, Path]:
    """(its cell row, the folder of the whole model) of the LM the adapters sit on, trained unless already there."""
    base = load_config("quickstart", [("train.max_steps", settings.lm_steps), ("train.epochs", settings.lm_steps),
                                      ("train.eval_every", 0),
                                      ("train.warmup_steps", min(10, settings.lm_steps // 3))])
    cell = Cell("full", LM_LR)
    row = run_cell(base, cell, work / "lm", qa_rows=text_rows, log=log)
    return row, work / "lm" / cell.name / METHODS["full"].output


def arm_method(arm: str, settings: VisionSettings) -> Modality:
    """The modality method of an arm: the same encoder and projector everywhere, the LoRA as the arm says."""
    spec = {"image_size": settings.image_size, "patch_size": settings.patch_size, "num_tokens": settings.num_tokens,
            "r": settings.r, **ARMS[arm]}
    return Modality(modalities={"image": ModalitySpec(**spec)})


def run_config(start: Path, train_file: Path, arm: str, lr: float, seed: int, folder: Path, settings: VisionSettings):
    """The RunConfig of one arm run: the quickstart recipe on the flag rows, from the frozen LM."""
    cfg = load_config("quickstart", [
        ("model.name_or_path", str(start)), ("data.source", str(train_file)), ("data.val_source", None),
        ("train.lr", lr), ("train.max_steps", settings.steps), ("train.epochs", settings.steps),
        ("train.seed", seed), ("train.eval_every", 0), ("train.micro_batch_size", settings.micro_batch),
        ("train.warmup_steps", min(10, settings.steps // 3)), ("train.progress", "none")])
    return dataclasses.replace(cfg, method=arm_method(arm, settings), name=folder.name,
                               output_dir=str(folder.parent))


def image_answers(model, tokenizer, rows: Sequence[dict], folder: Path, batch: int = 64) -> list[str]:
    """Greedy answers (at most 16 new tokens) to image rows (paths relative to `folder`), prompts as typed (the
    training rows' format)."""
    answers: list[str] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        answers += generate_texts(model, tokenizer, [row["prompt"] for row in chunk], max_new_tokens=16,
                                  images=[[str(folder / path) for path in row["images"]] for row in chunk])
    return answers


def score(model, tokenizer, sets: dict[str, list[dict]], text_rows: list[dict], folder: Path) -> dict:
    """{measure: {question id: exact match}} and the predictions, for the image sets and the text questions."""
    model.eval()
    marks, predictions = {}, {}
    for measure, rows in sets.items():
        answers = image_answers(model, tokenizer, rows, folder)
        marks[measure] = {question_id(row): exact_match(a, row["completion"]) for row, a in zip(rows, answers)}
        predictions[measure] = answers
    if text_rows:
        found = evaluate(model, tokenizer, text_rows, max_new_tokens=16, batch_size=64)
        marks["text"] = {question_id(row): exact_match(a, row["completion"])
                         for row, a in zip(text_rows, found["predictions"])}
        predictions["text"] = found["predictions"]
    return {"marks": marks, "predictions": predictions}


def arm_run(start: Path, train_file: Path, arm: str, lr: float, seed: int, folder: Path, sets: dict,
            text_rows: list[dict], settings: VisionSettings, log: Log) -> dict:
    """Train and score one run (or read it back): its scores.json content."""
    found = folder / SCORES_FILE
    if found.is_file():
        log(f"skip {folder.name}: already complete")
        return json.loads(found.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    result = run_training(run_config(start, train_file, arm, lr, seed, folder, settings), log=lambda line: None)
    scores = score(result.model, result.tokenizer, sets, text_rows, train_file.parent)
    row = {"arm": arm, "lr": lr, "seed": seed, "trainable_params": result.summary.trainable_params,
           "final_loss": result.summary.final_loss, "wall_time_s": time.perf_counter() - started,
           "accuracy": {m: float(np.mean(list(v.values()))) for m, v in scores["marks"].items()}, **scores}
    found.write_text(json.dumps(row) + "\n")
    log(f"done {folder.name}: " + ", ".join(f"{m} {100 * v:.1f}%" for m, v in row["accuracy"].items())
        + f" in {row['wall_time_s']:.0f} s")
    return row


def _validation_score(row: dict) -> float:
    """The lr search's score (lower is better): minus the pooled validation accuracy."""
    marks = [v for m in ("flag", "composed_seen") for v in row["marks"][m].values()]
    return -float(np.mean(marks))


def search_lr(arm: str, run: Callable[[str, float, int, Path], dict], work: Path, settings: VisionSettings
              ) -> dict:
    """The arm's lr search on validation renderings: the points run, the chosen lr, and whether it was capped."""
    search = evidence.LRSearch(settings.coarse, cap=settings.cap)
    scored: dict[int, float] = {}
    while True:
        points, state = evidence.next_points(search, scored)
        if state != "run":
            break
        for k in points:
            lr = evidence.lattice_lr(k)
            scored[k] = _validation_score(run(arm, lr, SWEEP_SEED, work / "sweep" / f"{arm}-lr{lr:.3g}"))
    best = evidence.best_point(scored)
    fitted, at_edge = evidence.fit_optimum(scored)
    return {"points": {f"{evidence.lattice_lr(k):.3g}": -v for k, v in sorted(scored.items())},
            "lr": evidence.lattice_lr(best), "fitted_lr": evidence.lattice_lr(fitted),
            "at_edge": at_edge and len(scored) > 1, "capped": state == "capped"}


def _marks(runs: Sequence[dict], measure: str, kind: str | None = None) -> np.ndarray:
    """(seeds x questions) exact-match marks of `measure`, only questions of `kind` when given."""
    questions = sorted(q for q in runs[0]["marks"][measure] if kind is None or q.endswith(f"/{kind}"))
    return np.array([[float(run["marks"][measure][q]) for q in questions] for run in runs])


def majority_continent(held_out: Sequence[str]) -> tuple[str, float]:
    """The continent most held-out countries share, and their share: what always answering it scores on the
    held-out continent questions."""
    continents = [country(name).continent for name in held_out]
    best = max(sorted(set(continents)), key=continents.count)
    return best, continents.count(best) / len(continents)


def summarize(arms: dict[str, dict], start_text: dict[str, bool], settings: VisionSettings) -> dict:
    """Means and intervals per arm and measure, and the differences the page reads."""
    def estimate(marks: np.ndarray, other: np.ndarray | None = None) -> dict:
        mean, interval = evidence.bootstrap_accuracy(marks, other, settings.bootstrap)
        return {"mean": mean, "interval": list(interval)}

    accuracy = {arm: {m: estimate(_marks(found["runs"], m)) for m in MEASURES} for arm, found in arms.items()}
    by_kind = {arm: {f"{m}/{kind}": estimate(_marks(found["runs"], m, kind)) for m in ("composed", "composed_seen")
                     for kind in COMPOSED} for arm, found in arms.items()}
    start = np.array([[float(start_text[q]) for q in sorted(start_text)]])
    differences = {
        "routed_minus_projector_composed": estimate(_marks(arms["routed"]["runs"], "composed"),
                                                    _marks(arms["projector-only"]["runs"], "composed")),
        "routed_minus_projector_flag": estimate(_marks(arms["routed"]["runs"], "flag"),
                                                _marks(arms["projector-only"]["runs"], "flag")),
        "routed_minus_shared_composed": estimate(_marks(arms["routed"]["runs"], "composed"),
                                                 _marks(arms["shared"]["runs"], "composed")),
        "shared_text_minus_start": estimate(_marks(arms["shared"]["runs"], "text"), start),
    }
    routed_text_equal = all(run["marks"]["text"] == start_text for run in arms["routed"]["runs"])
    return {"accuracy": accuracy, "by_kind": by_kind, "differences": differences, "routed_text_equal": routed_text_equal,
            "start_text": float(np.mean(list(start_text.values())))}


def run_vision(work: Path, settings: VisionSettings = FULL, log: Log = print) -> dict:
    """Run (or resume) the whole experiment in `work`; write and return results.json's content."""
    work = Path(work).resolve()
    text_rows = read_jsonl(EMBEDDED_DATASETS["embedded-eval"])[:settings.text_questions]
    sets = build_flag_rows(work / "data", train_renderings=settings.train_renderings,
                           eval_renderings=settings.eval_renderings, size=settings.image_size)
    train_file = work / "data" / "train.jsonl"
    write_jsonl(sets["train"], train_file)
    lm_row, start = lm_start(work, settings, text_rows, log)
    start_text = {question_id(row): exact_match(p["prediction"], row["completion"])
                  for row, p in zip(text_rows, read_jsonl(work / "lm" / lm_row["name"] / "predictions.jsonl"))}
    validation = {m: sets[f"validation_{m}"] for m in ("flag", "composed_seen")}
    test = {m: sets[f"test_{m}"] for m in ("flag", "composed", "composed_seen")}

    def sweep_run(arm: str, lr: float, seed: int, folder: Path) -> dict:
        return arm_run(start, train_file, arm, lr, seed, folder, validation, [], settings, log)

    searches = {arm: search_lr(arm, sweep_run, work, settings) for arm in ARMS}
    arms = {}
    for arm, found in searches.items():
        runs = [arm_run(start, train_file, arm, found["lr"], seed, work / f"seed{seed}" / f"{arm}-lr{found['lr']:.3g}",
                        test, text_rows, settings, log) for seed in settings.seeds]
        arms[arm] = {"lr": found["lr"], "runs": runs}
    split = split_flags()
    results = {"settings": dataclasses.asdict(settings), "arms_settings": ARMS,
               "countries": {"flags": sorted(FLAGS), "composed_train": list(split.composed_train),
                             "composed_held_out": list(split.composed_held_out)},
               "composed_kinds": list(COMPOSED),
               "majority_continent": majority_continent(split.composed_held_out),
               "rows": {**{name: len(rows) for name, rows in sets.items()}, "text": len(text_rows)},
               "data_dir": str(train_file.parent),
               "lm": {"name": lm_row["name"], "lr": LM_LR, "steps": settings.lm_steps,
                      "text_accuracy": lm_row["accuracy"]},
               "searches": searches,
               "arms": {arm: {"lr": found["lr"],
                              "runs": [{k: v for k, v in run.items() if k != "predictions"} for run in found["runs"]]}
                        for arm, found in arms.items()},
               "examples_flag": [(row["images"][0], answer, row["completion"]) for row, answer in
                                 zip(test["flag"][::max(1, settings.eval_renderings)],
                                     arms["routed"]["runs"][0]["predictions"]["flag"][::max(1, settings.eval_renderings)])],
               **summarize(arms, start_text, settings)}
    (work / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return results
