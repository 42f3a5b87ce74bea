"""The lab's experiments (a)-(f) and (i) on the embedded model: the runs docs/lab.md is written from.

Every run is LoRA (alpha 32 fixed, so the update is scaled by 32 / r as in LoRA Without Regret; only (i)'s arms
change alpha or the micro-batch) or full fine-tuning of the embedded model on the embedded QA set, an ordinary
sweep cell (`analysis.sweep.run_cell`: one run folder and one cell.json each, so a killed lab resumes where it
stopped). Every run is scored row by row on the held-out questions (validation then test split,
`evidence.split_held_out`), on fresh pre-training-style text (general loss: forgetting) and on its own training
rows (capacity).

    arms     LoRA all-linear at each rank of `ranks`; full fine-tuning; attention-only and MLP-only LoRA at the rank
             whose trainable count matches all-linear r16's (`matched_rank`); (i) (`more_arms`): DoRA and QLoRA r16,
             LoRA r16 at other alphas (search only), LoRA r16 and full at other micro-batch sizes (own run folders:
             `Arm.variant`)
    capacity (j) all-linear LoRA at each rank, each at its own searched lr, one pass over random facts, their bits
             set beside each rank's parameters (lab/capacity.py)
    search   each arm's learning rate on the 2x lattice (`evidence.LRSearch`), seed 0, chosen by the lowest
             validation QA loss; the arms of (e) save a checkpoint per epoch, scored on every row set
    trade    (e) the same number of lattice points around the best for LoRA r16 and full (`tradeoff` offsets)
    finals   each arm at its grid best, one run per seed of `seeds` (never seed 0), reported on the test split
    spectra  (f) every run of LoRA r16 and full: intruder dimensions against a random update of the same spectrum
             (lab/intruders.py), and for the finals the causal test (the intruders' singular values scaled down)

`run_lab` returns (and writes WORK/results.json) everything the page needs; lab/claims.py turns it into verdicts.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit.adapters import LoRA
from lorakit.analysis.params import method_count
from lorakit.analysis.sweep import (CELL_FILE, CHECKPOINTS_FILE, LOSSES_FILE, PREDICTIONS_FILE, Cell, row_losses,
                                    run_cell)
from lorakit.config import load_config
from lorakit.infer.evaluate import evaluate
from lorakit.infer.metrics import exact_match
from lorakit.lab import evidence
from lorakit.lab.capacity import run_capacity
from lorakit.lab.datasets import read_jsonl
from lorakit.lab.evidence import Budget, LRSearch, fit_optimum, lattice_lr, next_points
from lorakit.lab.intruders import causal_record, intruder_record, update_size
from lorakit.lab.probe import probe_rows, score_probe
from lorakit.models import EMBEDDED_DATASETS, load_model, load_tokenizer, quiet_progress_bars

Log = Callable[[str], None]
ALPHA = 32.0
REFERENCE_RANK = 16  # all-linear LoRA r16: the reference arm of (a), (c), (d), (e), (f)
SEARCH_SEED = 0  # the lr search's seed; the finals use others, so no final run repeats a search run
RESULTS_FILE = "results.json"
BASE_FILE = "base.json"


@dataclass(frozen=True)
class LabSettings:
    """How big the lab is: FULL for docs/lab.md, QUICK for the tests (about a minute)."""

    epochs: int
    train_rows: int | None  # the first N training rows (None: all 600)
    general_rows: int | None  # the first N general-text documents (None: all 200)
    validation_countries: int  # held-out countries that choose learning rates; the others report
    test_countries: int | None  # None: every other held-out country
    ranks: tuple[int, ...]  # all-linear LoRA ranks of (b); must hold REFERENCE_RANK
    seeds: tuple[int, ...]  # the finals' seeds
    lora_coarse: tuple[int, ...]  # coarse lattice exponents of the LoRA arms (lr = 1e-3 * 2**k)
    full_coarse: tuple[int, ...]  # and of full fine-tuning
    cap: int  # most lattice points before refining: a best point still at an edge then is "capped" (a warning)
    tradeoff: tuple[int, ...]  # (e): lattice offsets around the best point, the same for both methods
    bootstrap: int  # resamples of every interval
    more: bool = True  # (i): DoRA, QLoRA, alpha and batch-size arms
    alphas: tuple[float, ...] = (8.0, ALPHA, 128.0)  # (i): the reference arm's alphas (ALPHA: the reference)
    batches: tuple[int, ...] = (4, 64)  # (i): micro-batch sizes besides the recipe's; full runs at the largest
    capacity_countries: int = 10  # (j): fictional countries of the random-fact set (0: no (j))
    capacity_repeats: int = 100  # (j): times each fact appears in its single pass
    capacity_coarse: tuple[int, ...] = (0, 2)  # (j): coarse lattice exponents of every rank's lr search


FULL = LabSettings(epochs=6, train_rows=None, general_rows=None, validation_countries=22, test_countries=None,
                   ranks=(1, 4, 16, 64), seeds=(1, 2, 3), lora_coarse=(-2, 0, 2, 4), full_coarse=(-6, -4, -2, 0),
                   cap=9, tradeoff=(-2, -1, 0, 1, 2), bootstrap=2000)
QUICK = LabSettings(epochs=2, train_rows=48, general_rows=16, validation_countries=3, test_countries=5,
                    ranks=(1, REFERENCE_RANK), seeds=(1, 2), lora_coarse=(0, 2), full_coarse=(-4, -2), cap=4,
                    tradeoff=(-1, 0, 1), bootstrap=200, alphas=(ALPHA, 128.0), batches=(64,), capacity_countries=4,
                    capacity_repeats=2, capacity_coarse=(1,))


@dataclass(frozen=True)
class Arm:
    """One configuration whose learning rate is searched: a method, rank and target set."""

    method: str
    r: int | None = None
    targets: str | None = None
    per_epoch: bool = False  # its search runs save and score a checkpoint per epoch ((e)'s trade-off curves)
    alpha: float = ALPHA
    micro_batch: int | None = None  # None: the recipe's
    finals: bool = True  # False: its lr search is all it needs ((i)'s alpha arms read only their fitted optima)

    def cell(self, k: int) -> Cell:
        return Cell(self.method, lattice_lr(k), self.r, self.targets)

    @property
    def variant(self) -> str:
        """The run folder's suffix for a non-default alpha or micro-batch ('' for the others), so that the same
        cell name at another alpha or batch size is another run."""
        return ((f"-alpha{self.alpha:g}" if self.alpha != ALPHA else "")
                + (f"-mb{self.micro_batch}" if self.micro_batch is not None else ""))


def matched_rank(targets: str, reference_rank: int = REFERENCE_RANK) -> int:
    """The LoRA rank at which `targets` trains as many numbers as all-linear LoRA at `reference_rank` (counted on
    the embedded model's skeleton; the count is linear in r, so the nearest integer)."""
    per_rank = method_count("embedded", LoRA(r=1, alpha=ALPHA, targets=targets)).trainable
    reference = method_count("embedded", LoRA(r=reference_rank, alpha=ALPHA, targets="all-linear")).trainable
    return max(1, round(reference / per_rank))


def lab_arms(settings: LabSettings) -> dict[str, Arm]:
    """Every arm of the lab, by name."""
    arms = {f"lora-r{r}": Arm("lora", r, "all-linear", per_epoch=r == REFERENCE_RANK) for r in settings.ranks}
    arms["full"] = Arm("full", per_epoch=True)
    for targets in ("attention", "mlp"):
        r = matched_rank(targets)
        arms[f"{targets}-r{r}"] = Arm("lora", r, targets)
    return {**arms, **more_arms(settings)}


def more_arms(settings: LabSettings) -> dict[str, Arm]:
    """(i)'s arms: DoRA and QLoRA at the reference rank; the reference at other alphas (search only); the
    reference and full fine-tuning at other micro-batch sizes. Their baselines are the arms of (a)-(f)."""
    if not settings.more:
        return {}
    ref = REFERENCE_RANK
    arms = {f"{method}-r{ref}": Arm(method, ref, "all-linear") for method in ("dora", "qlora")}
    for alpha in settings.alphas:
        if alpha != ALPHA:
            arms[f"lora-r{ref}-alpha{alpha:g}"] = Arm("lora", ref, "all-linear", alpha=alpha, finals=False)
    for batch in settings.batches:
        arms[f"lora-r{ref}-mb{batch}"] = Arm("lora", ref, "all-linear", micro_batch=batch)
    arms[f"full-mb{max(settings.batches)}"] = Arm("full", micro_batch=max(settings.batches))
    return arms


def lab_config(settings: LabSettings, seed: int = SEARCH_SEED, save_every: int = 0) -> Any:
    """The quickstart recipe: `settings.epochs` passes, `seed`, no validation during the run (the lab scores
    each run itself), dense loss logging; checkpoints only every `save_every` steps (0: none), all kept."""
    cfg = load_config("quickstart")
    data = dataclasses.replace(cfg.data, val_source=None, limit=settings.train_rows)
    train = dataclasses.replace(cfg.train, epochs=settings.epochs, eval_every=0, log_every=2, seed=seed,
                                save_every=save_every, save_every_minutes=0, keep_checkpoints=0)
    return dataclasses.replace(cfg, data=data, train=train)


def _first(rows: list[dict], count: int | None) -> list[dict]:
    return rows if count is None else rows[:count]


def lab_rows(settings: LabSettings) -> dict[str, list[dict]]:
    """The row sets: validation and test questions, general text, the training rows."""
    splits = evidence.split_held_out(read_jsonl(EMBEDDED_DATASETS["embedded-eval"]), settings.validation_countries,
                                     settings.test_countries)
    return {**splits, "general": _first(read_jsonl(EMBEDDED_DATASETS["embedded-general"]), settings.general_rows),
            "train": _first(read_jsonl(EMBEDDED_DATASETS["embedded-train"]), settings.train_rows)}


def _scores(correct: list[bool], losses: dict[str, list[float]], n_validation: int) -> dict:
    """One run's (or the base model's) per-row scores, split into validation and test."""
    held = losses["held_out"]
    return {"validation_loss": sum(held[:n_validation]) / max(n_validation, 1),
            "correct": {"validation": correct[:n_validation], "test": correct[n_validation:]},
            "losses": {"validation": held[:n_validation], "test": held[n_validation:],
                       "general": losses["general"], "train": losses["train"]}}


def _train_cell(job: tuple) -> None:
    """Train one cell in a worker process (its scores are read back by the parent's `Lab.run`)."""
    cfg, cell, folder, qa_rows, loss_rows, alpha = job
    run_cell(cfg, cell, folder, alpha=alpha, qa_rows=qa_rows, loss_rows=loss_rows, log=lambda line: None)


def _start_worker() -> None:
    """A worker trains on one CPU thread, quietly."""
    torch.set_num_threads(1)
    quiet_progress_bars()


class Lab:
    """The runs of one lab: cells trained (`workers` at a time) or read back, counted per experiment."""

    def __init__(self, work: Path, settings: LabSettings, log: Log = print, workers: int = 1) -> None:
        self.work, self.settings, self.log, self.workers = Path(work), settings, log, workers
        self.rows = lab_rows(settings)
        self.held_out = self.rows["validation"] + self.rows["test"]
        self.n_validation = len(self.rows["validation"])
        self.loss_rows = {"held_out": self.held_out, "general": self.rows["general"], "train": self.rows["train"]}
        self.budget = Budget()
        self.steps_per_epoch = -(-len(self.rows["train"]) // lab_config(settings).train.micro_batch_size)
        self.pool: ProcessPoolExecutor | None = None

    def _job(self, arm: Arm, k: int, seed: int) -> tuple:
        """(config, cell, folder, QA rows, loss rows, alpha) of one run; (e)'s arms at seed 0 save a checkpoint per
        epoch."""
        per_epoch = arm.per_epoch and seed == SEARCH_SEED
        cfg = lab_config(self.settings, seed, self.steps_per_epoch if per_epoch else 0)
        if arm.micro_batch is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=arm.micro_batch))
        return cfg, arm.cell(k), self.work / f"seed{seed}{arm.variant}", self.held_out, self.loss_rows, arm.alpha

    def train(self, runs: list[tuple[Arm, int, int]]) -> None:
        """Train the runs (arm, k, seed) not complete yet, `workers` at a time (1: in this process, by `run`)."""
        self.train_many(_train_cell, [self._job(*run) for run in runs])

    def train_many(self, train: Callable[[tuple], None], jobs: list[tuple]) -> None:
        """`train(job)` for each job (config, cell, folder, ...) whose run is not complete, `workers` at a time in
        worker processes; with one worker (or one job) nothing here: the caller's `run_cell` trains it."""
        todo = [job for job in jobs if not (job[2] / job[1].name / CELL_FILE).is_file()]
        if self.workers <= 1 or len(todo) <= 1:
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker)
        self.log(f"lab: training {len(todo)} runs, {self.workers} at a time")
        list(self.pool.map(train, todo))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def run(self, experiments: tuple[str, ...], arm: Arm, k: int, seed: int) -> dict:
        """Train (or read back) `arm` at lattice point k and `seed`; its row with its per-row scores."""
        cfg, cell, folder, qa_rows, loss_rows, alpha = self._job(arm, k, seed)
        row = run_cell(cfg, cell, folder, alpha=alpha, qa_rows=qa_rows, loss_rows=loss_rows, log=self.log)
        for experiment in experiments:
            self.budget.use(experiment, f"{folder.name}/{cell.name}")
        cell_dir = folder / cell.name
        answers = read_jsonl(cell_dir / PREDICTIONS_FILE)
        correct = [exact_match(r["prediction"], r["completion"]) for r in answers]
        found = {"name": cell.name, "folder": folder.name, "k": k, "lr": cell.lr, "seed": seed,
                 "steps": row["steps"], "trainable_params": row["trainable_params"],
                 "final_train_loss": row["final_train_loss"], "wall_time_s": row["wall_time_s"],
                 "train_time_s": row["train_time_s"],
                 "predictions": [r["prediction"] for r in answers[self.n_validation:]],
                 **_scores(correct, json.loads((cell_dir / LOSSES_FILE).read_text()), self.n_validation)}
        if (cell_dir / CHECKPOINTS_FILE).is_file():
            found["epochs"] = [{"step": point["step"], "test": point["held_out"][self.n_validation:],
                                "general": point["general"]}
                               for point in json.loads((cell_dir / CHECKPOINTS_FILE).read_text())]
        return found

    def runs(self, experiments: dict[str, tuple[str, ...]], runs: list[tuple[str, Arm, int, int]]) -> list[dict]:
        """`run` for each (arm name, arm, k, seed), trained `workers` at a time first."""
        self.train([(arm, k, seed) for _, arm, k, seed in runs])
        return [self.run(experiments[name], arm, k, seed) for name, arm, k, seed in runs]

    def search(self, arms: dict[str, Arm], experiments: dict[str, tuple[str, ...]]) -> dict[str, dict]:
        """Every arm's lr search at seed 0, in rounds (each round's runs of all arms together): per arm its grid
        (exponent -> run), state, best point and fitted optimum."""
        grids: dict[str, dict[int, dict]] = {name: {} for name in arms}
        states: dict[str, str] = {}
        while True:
            todo = []
            for name, arm in arms.items():
                coarse = self.settings.full_coarse if arm.method == "full" else self.settings.lora_coarse
                scored = {k: run["validation_loss"] for k, run in grids[name].items()}
                ks, states[name] = next_points(LRSearch(coarse, self.settings.cap), scored)
                todo += [(name, arm, k, SEARCH_SEED) for k in ks]
            if not todo:
                break
            for (name, _, k, _), found in zip(todo, self.runs(experiments, todo)):
                grids[name][k] = found
        results = {}
        for name, grid in grids.items():
            scored = {k: run["validation_loss"] for k, run in grid.items()}
            fitted, at_edge = fit_optimum(scored)
            best = evidence.best_point(scored)
            if states[name] == "capped":
                self.log(f"lab: WARNING {name}'s best lr {lattice_lr(best):.3g} is at the edge of its grid after "
                         f"{len(grid)} points (the cap)")
            results[name] = {"grid": dict(sorted(grid.items())), "state": states[name], "best_k": best,
                             "fit_k": fitted, "at_edge": at_edge}
        return results


INTRUDER_ARMS = (f"lora-r{REFERENCE_RANK}", "full")
EXPERIMENTS = {  # which sections use each arm's search and finals (for the run budget)
    "full": ("b", "c", "e", "f"), f"lora-r{REFERENCE_RANK}": ("a", "b", "c", "d", "e", "f")}


def _experiments(name: str, arm: Arm) -> tuple[str, ...]:
    if arm.variant or arm.method != "lora" and arm.method != "full":
        return ("i",)
    return EXPERIMENTS.get(name, ("d",) if name.startswith(("attention", "mlp")) else ("b",))


def score_base(work: Path, rows: dict[str, list[dict]], n_validation: int) -> dict:
    """The untuned embedded model's per-row scores and its fill-in-the-blank probe (cached in base.json)."""
    path = Path(work) / BASE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_model("embedded"), load_tokenizer("embedded")
    held_out = rows["validation"] + rows["test"]
    answers = evaluate(model, tokenizer, held_out, max_new_tokens=16, batch_size=64)["predictions"]
    losses = {name: row_losses(model, tokenizer, found) for name, found in
              (("held_out", held_out), ("general", rows["general"]), ("train", rows["train"]))}
    base = {**_scores([exact_match(a, r["completion"]) for a, r in zip(answers, held_out)], losses, n_validation),
            "predictions": answers, "probe": score_probe(model, tokenizer, probe_rows(rows["test"]))}
    Path(work).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base) + "\n")
    return base


def run_lab(work: Path, settings: LabSettings = FULL, log: Log = print, workers: int = 1) -> dict:
    """Run (or resume) every experiment in `work`, `workers` runs at a time; write and return results.json's
    content."""
    work = Path(work)
    lab = Lab(work, settings, log, workers)
    try:
        base = score_base(work, lab.rows, lab.n_validation)
        arms = lab_arms(settings)
        shared = (f"lora-r{REFERENCE_RANK}", "full") if settings.more else ()  # (i) compares its arms with these
        experiments = {name: _experiments(name, arm) + (("i",) if name in shared else ()) for name, arm in arms.items()}
        found = lab.search(arms, experiments)
        extra = [(name, arm, found[name]["best_k"] + offset, SEARCH_SEED)  # (e): the same offsets for both methods
                 for name, arm in arms.items() if arm.per_epoch for offset in settings.tradeoff
                 if found[name]["best_k"] + offset not in found[name]["grid"]]
        for (name, _, k, _), run in zip(extra, lab.runs({name: ("e",) for name in arms}, extra)):
            found[name]["grid"][k] = run
        for name in arms:
            found[name]["finals"] = []
        finals = [(name, arm, found[name]["best_k"], seed) for name, arm in arms.items() if arm.finals
                  for seed in settings.seeds]
        for (name, *_), run in zip(finals, lab.runs(experiments, finals)):
            found[name]["finals"].append(run)
        capacity = None
        if settings.capacity_countries:
            capacity = run_capacity(lab_config(settings), work, settings.ranks, settings.seeds,
                                    LRSearch(settings.capacity_coarse, settings.cap), SEARCH_SEED, ALPHA,
                                    settings.capacity_countries, settings.capacity_repeats, lab.budget, log,
                                    lab.train_many)
    finally:
        lab.close()
    for name in arms:
        found[name]["grid"] = [found[name]["grid"][k] for k in sorted(found[name]["grid"])]  # JSON keys are text
    for name in INTRUDER_ARMS:  # (f): every run of LoRA r16 and full, against a random update of its spectrum
        for run in found[name]["grid"] + found[name]["finals"]:
            record = intruder_record(work / run["folder"] / run["name"], seed=run["seed"])
            run["intruders"] = {"size": update_size(record),
                                **{key: [c for m in record["modules"] for c in m[key]]
                                   for key in ("cosines", "random_cosines")}}
        for run in found[name]["finals"]:  # the causal test: the intruders' singular values scaled down
            causal = causal_record(work / run["folder"] / run["name"], lab.rows["test"], lab.rows["general"])
            run["causal"] = {key: causal[key] for key in ("scale", "eps", "before", "after")}
    recipe = lab_config(settings).train
    results = {"settings": dataclasses.asdict(settings), "alpha": ALPHA, "reference_rank": REFERENCE_RANK,
               "recipe": {key: getattr(recipe, key) for key in ("micro_batch_size", "warmup_steps", "schedule")},
               "arms": {name: {**dataclasses.asdict(arm), **found[name]} for name, arm in arms.items()},
               "questions": {name: [{k: row[k] for k in ("prompt", "completion", "kind", "country")}
                                    for row in lab.rows[name]] for name in ("validation", "test")},
               "rows": {name: len(lab.rows[name]) for name in ("general", "train")},
               "base": base, "capacity": capacity,
               "budget": {"runs": lab.budget.counts(), "distinct": lab.budget.distinct}}
    (work / RESULTS_FILE).write_text(json.dumps(results) + "\n")
    return results
