"""The quickstart (`lorakit quickstart`, commands/quickstart.py): the lecture's demo, offline, base vs tuned.

The embedded base model knows facts about countries (it read them in pre-training) but has
never seen a question. LoRA fine-tuning on question/answer pairs about 60% of the countries
teaches it to answer; the held-out 40% show that it answers from what it already knew.
Pre-training teaches knowledge, post-training teaches behaviour.

With `--dpo`, preference tuning follows: DPO from the SFT adapter (its reference model: base + that
adapter) on the embedded preference set (lab/preference.py: the same questions about the same
training countries, the right answer chosen, a plausible wrong one rejected), then the held-out
questions again: accuracy, the margin log p(chosen) - log p(rejected), and the general-text loss
(what it cost in forgetting), SFT against SFT + DPO.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorakit.adapters import LoRA, load_adapter
from lorakit.config import ModelConfig, RunConfig
from lorakit.data import DataConfig
from lorakit.infer.evaluate import evaluate
from lorakit.lab.config import QUICKSTART_OUT
from lorakit.lab.datasets import qa_row, read_jsonl
from lorakit.lab.facts import country
from lorakit.lab.preference import margin_scores, measure_preferences
from lorakit.lab.report import accuracy_by_kind, dpo_markdown, markdown_report
from lorakit.models import EMBEDDED_DATASETS, load_model, load_tokenizer
from lorakit.run import free_run_dir, run_training
from lorakit.train import TrainConfig

# (country, question kind) shown side by side; all held out from fine-tuning
SHOWN = (("the Netherlands", "capital"), ("Japan", "capital"), ("Kenya", "currency"),
         ("Peru", "continent"), ("Canada", "capital"), ("Norway", "currency"))


def quickstart_run_dir(out: Path | None) -> Path:
    """`out` as given, or the first of runs/quickstart, runs/quickstart-2, ... not yet used."""
    return Path(out) if out is not None else free_run_dir(QUICKSTART_OUT.parent, QUICKSTART_OUT.name)


def run_config(args: argparse.Namespace, run_dir: Path):
    """The RunConfig of the LoRA fine-tuning (the same thing `lorakit train` would run)."""
    data = DataConfig(source=str(EMBEDDED_DATASETS["embedded-train"]), format="prompt_completion",
                      val_source=str(EMBEDDED_DATASETS["embedded-eval"]), max_length=64)
    train = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.steps,
                        micro_batch_size=args.batch_size, schedule="linear", warmup_steps=10,
                        eval_every=25, seed=args.seed, log_every=5, progress=args.progress)
    return RunConfig(model=ModelConfig(name_or_path="embedded"),
                     method=LoRA(r=args.r, alpha=args.alpha, targets="all-linear"),
                     data=data, train=train, name=run_dir.name, output_dir=str(run_dir.parent))


def dpo_config(args: argparse.Namespace, run_dir: Path, sft_adapter: Path) -> RunConfig:
    """The RunConfig of DPO on the embedded preference set, continuing the SFT adapter (what
    configs/quickstart-dpo.yaml holds, with the adapter of this quickstart's SFT run)."""
    data = DataConfig(source=str(EMBEDDED_DATASETS["embedded-pref-train"]), format="preference",
                      val_source=str(EMBEDDED_DATASETS["embedded-pref-eval"]), max_length=64)
    train = TrainConfig(objective="dpo", beta=args.dpo_beta, lr=args.dpo_lr, epochs=args.dpo_epochs,
                        max_steps=args.dpo_steps, micro_batch_size=args.batch_size, schedule="linear",
                        warmup_steps=5, eval_every=25, seed=args.seed, log_every=5, progress=args.progress)
    return RunConfig(model=ModelConfig(name_or_path="embedded", init_adapter=str(sft_adapter)),
                     method=LoRA(r=args.r, alpha=args.alpha, targets="all-linear"),
                     data=data, train=train, name="dpo", output_dir=str(run_dir))


def changed_answers(rows: list[dict], sft: dict, dpo: dict) -> list[dict]:
    """The held-out questions whose greedy answer DPO changed, with both answers."""
    return [{"prompt": row["prompt"], "reference": row["chosen"], "sft": before, "dpo": after}
            for row, before, after in zip(rows, sft["predictions"], dpo["predictions"]) if before.strip() != after.strip()]


def dpo_stage(args: argparse.Namespace, sft_adapter: Path, run_dir: Path, tuned: dict, general_rows: list[dict],
              log=print) -> dict:
    """DPO from the SFT adapter; the held-out preference rows scored before and after. `tuned`: the SFT model's
    scores on the same questions (the preference rows ask the SFT evaluation's questions, in its order)."""
    pref_rows = read_jsonl(EMBEDDED_DATASETS["embedded-pref-eval"])
    tokenizer = load_tokenizer("embedded")
    log(f"scoring the SFT model's margins on {len(pref_rows)} held-out preference pairs ...")
    sft_model = load_adapter(load_model("embedded"), sft_adapter)
    sft = {"accuracy": tuned["accuracy"], **margin_scores(sft_model, tokenizer, pref_rows),
           "general_loss": tuned["general_loss"], "predictions": tuned["predictions"]}
    cfg = dpo_config(args, run_dir, sft_adapter)
    log(f"DPO from the SFT adapter on {len(read_jsonl(EMBEDDED_DATASETS['embedded-pref-train']))} preference "
        "pairs about the training countries ...")
    result = run_training(cfg, log=log)
    log("scoring the SFT + DPO model ...")
    dpo = measure_preferences(load_adapter(load_model("embedded"), result.output), tokenizer, pref_rows, general_rows)
    summary = result.summary
    return {"run_dir": str(result.run_dir), "adapter": str(result.output), "beta": cfg.train.beta,
            "pairs": {"eval": len(pref_rows)}, "changed": changed_answers(pref_rows, sft, dpo),
            "sft": {k: v for k, v in sft.items() if k != "predictions"},
            "dpo": {k: v for k, v in dpo.items() if k != "predictions"},
            "training": {"steps": summary.steps, "epochs": summary.epochs, "wall_time_s": summary.wall_time_s,
                         "final_loss": summary.final_loss}}


def score(model, tokenizer, eval_rows: list[dict], general_rows: list[dict]) -> dict:
    """Held-out accuracy by kind, predictions, and the loss on general text (forgetting)."""
    qa = evaluate(model, tokenizer, eval_rows, max_new_tokens=16, batch_size=64)
    general = evaluate(model, tokenizer, general_rows, batch_size=64)
    return {"accuracy": accuracy_by_kind(eval_rows, qa["predictions"]),
            "contains": qa["contains"], "qa_loss": qa["loss"], "general_loss": general["loss"],
            "predictions": qa["predictions"]}


def examples(eval_rows: list[dict], base: dict, tuned: dict) -> list[dict]:
    """The SHOWN questions with both models' answers."""
    index = {(row["country"], row["kind"]): i for i, row in enumerate(eval_rows)}
    shown = []
    for name, kind in SHOWN:
        row = qa_row(country(name), kind)
        i = index[(row["country"], kind)]
        shown.append({"prompt": row["prompt"], "reference": row["completion"],
                      "base": base["predictions"][i], "tuned": tuned["predictions"][i]})
    return shown


def build_report(result, cfg, base: dict, tuned: dict, eval_rows: list[dict],
                 train_rows: list[dict], general_rows: list[dict], wall_s: float) -> dict:
    """Everything the terminal, report.md and report.json show."""
    summary = result.summary
    return {
        "model": "embedded", "method": f"LoRA r={cfg.method.r}, alpha={cfg.method.alpha}, all-linear",
        "run_dir": str(result.run_dir), "adapter": str(result.output),
        "loss_curve": str(result.run_dir / "loss_curve.png"), "loss_curve_name": "loss_curve.png",
        "data": {"train_rows": len(train_rows), "eval_rows": len(eval_rows),
                 "train_countries": len({r["country"] for r in train_rows}),
                 "eval_countries": len({r["country"] for r in eval_rows}),
                 "general_rows": len(general_rows)},
        "base": {k: v for k, v in base.items() if k != "predictions"},
        "tuned": {k: v for k, v in tuned.items() if k != "predictions"},
        "examples": examples(eval_rows, base, tuned),
        "parameters": {"trainable": summary.trainable_params, "total": summary.total_params},
        "training": {"steps": summary.steps, "epochs": summary.epochs,
                     "wall_time_s": summary.wall_time_s, "tokens_per_s": summary.tokens_per_s,
                     "final_loss": summary.final_loss},
        "wall_time_s": wall_s,
    }


def write_predictions(eval_rows: list[dict], base: dict, tuned: dict, run_dir: Path) -> Path:
    """predictions.jsonl: every held-out question with the reference and both models' answers."""
    path = run_dir / "predictions.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row, before, after in zip(eval_rows, base["predictions"], tuned["predictions"]):
            record = {"country": row["country"], "kind": row["kind"], "prompt": row["prompt"],
                      "reference": row["completion"], "base": before, "tuned": after}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_report(report: dict, run_dir: Path) -> None:
    """report.json, and report.md: the side-by-side first (then SFT vs DPO, with --dpo), then the training
    run's own report."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report_md = run_dir / "report.md"
    run_part = report_md.read_text(encoding="utf-8") if report_md.is_file() else ""
    dpo_part = dpo_markdown(report) + "\n" if "dpo" in report else ""
    report_md.write_text(markdown_report(report) + "\n" + dpo_part + run_part.replace("# Run", "## Training run", 1),
                         encoding="utf-8")


def quickstart(args: argparse.Namespace, log=print) -> dict:
    """Score the base model, LoRA-tune it, score again; write and return the report."""
    started = time.perf_counter()
    run_dir = quickstart_run_dir(args.out)
    train_rows, eval_rows, general_rows = (read_jsonl(EMBEDDED_DATASETS[name]) for name in
                                           ("embedded-train", "embedded-eval", "embedded-general"))
    tokenizer = load_tokenizer("embedded")
    log(f"scoring the base model on {len(eval_rows)} held-out questions ...")
    base = score(load_model("embedded"), tokenizer, eval_rows, general_rows)
    cfg = run_config(args, run_dir)
    log(f"LoRA fine-tuning on {len(train_rows)} questions about other countries ...")
    result = run_training(cfg, log=log)
    tuned_model = load_adapter(load_model("embedded"), result.output)
    log("scoring the tuned model ...")
    tuned = score(tuned_model, tokenizer, eval_rows, general_rows)
    report = build_report(result, cfg, base, tuned, eval_rows, train_rows, general_rows,
                          time.perf_counter() - started)
    if getattr(args, "dpo", False):
        report["dpo"] = dpo_stage(args, result.output, result.run_dir, tuned, general_rows, log)
        report["dpo"]["base_general_loss"] = base["general_loss"]
        report["wall_time_s"] = time.perf_counter() - started
    write_report(report, result.run_dir)
    write_predictions(eval_rows, base, tuned, result.run_dir)
    return report
