"""A Hugging Face model card (README.md) for a run's adapter or model: what `lorakit push` uploads beside it.

`card_facts(path)` reads what a run folder holds (run.py's layout: config.yaml, summary.json, data_stats.json,
metrics.jsonl, the quickstart's report.json, the adapter or model folder with its lorakit_run.json); an adapter
or model folder alone gives what its own files say. `model_card(facts, repo_id)` turns those facts into the card,
a pure function: YAML front matter the Hub reads (base_model, library_name, license, tags), then the method and
its hyperparameters, the data, the training settings, the results, the command that reproduces the run and how
to load the result with peft or transformers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import try_to_load_from_cache

from lorakit.data.prompting import RUN_OUTPUTS, is_model_folder, output_folder, read_record, run_name
from lorakit.errors import LorakitError
from lorakit.models import EMBEDDED_NAME
from lorakit.run import CONFIG_FILE, DATA_STATS_FILE
from lorakit.train.metrics import METRICS_FILE, SUMMARY_FILE, read_metrics

LORAKIT_LICENSE = "apache-2.0"  # lorakit's, and so the embedded base model's, which ships inside it
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: what the Hub accepts as base_model
TRAIN_KEYS = ("objective", "lr", "epochs", "max_steps", "micro_batch_size", "grad_accum", "schedule", "warmup_steps",
              "warmup_ratio", "weight_decay", "max_grad_norm", "precision", "seed")
OBJECTIVE_KEYS = {"dpo": ("beta", "label_smoothing"), "ipo": ("beta",), "simpo": ("beta", "simpo_gamma"),
                  "orpo": ("orpo_lambda",),
                  "grpo": ("num_generations", "rewards", "grpo_loss_type", "grpo_beta", "max_completion_length")}
DATA_KEYS = ("source", "subset", "split", "limit", "val_source", "val_split", "val_fraction", "format", "max_length",
             "packing")
RESULT_LABELS = {"final_loss": "final train loss", "final_eval_loss": "final eval loss",
                 "best_eval_loss": "best eval loss", "best_eval_step": "best eval step", "steps": "optimizer steps",
                 "epochs": "epochs", "trained_tokens": "trained tokens", "trainable_params": "trainable parameters",
                 "total_params": "all parameters", "wall_time_s": "training time (s)"}  # summary.json's keys
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora")


@dataclass
class CardFacts:
    """What a card says about one run's result, read from its folders (`card_facts`)."""

    name: str  # the run's name (or the folder's)
    folder: Path  # the folder whose files are uploaded: an adapter (PEFT format) or a whole model
    whole_model: bool  # a fine-tuned model folder (method full), not an adapter
    base_model: str
    revision: str | None = None
    method: dict[str, Any] = field(default_factory=dict)  # name and hyperparameters
    data: dict[str, Any] = field(default_factory=dict)  # source, format, rows, tokens
    training: dict[str, Any] = field(default_factory=dict)  # objective and optimisation settings
    results: dict[str, Any] = field(default_factory=dict)  # final and best losses, eval metrics, steps
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # metric, base, tuned (quickstart's report.json)
    prompt: dict[str, Any] | None = None  # the prompt format recorded with the adapter
    config_text: str | None = None  # the run's config.yaml, verbatim
    license: str | None = None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as error:
        raise LorakitError(f"cannot read {path}: {error}") from error


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a markdown text (between its first two '---' lines); {} without one."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    loaded = yaml.safe_load(match.group(1))
    return loaded if isinstance(loaded, dict) else {}


def base_license(base_model: str) -> str | None:
    """The base model's license, where it is known without the network: lorakit's for the embedded model, else the
    front matter of the README.md in its local folder or in the Hugging Face cache."""
    if base_model == EMBEDDED_NAME:
        return LORAKIT_LICENSE
    readme = Path(base_model) / "README.md"
    if not readme.is_file() and HUB_ID.match(base_model):
        cached = try_to_load_from_cache(base_model, "README.md")
        readme = Path(cached) if isinstance(cached, str) else readme
    if not readme.is_file():
        return None
    license_name = front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
    return str(license_name) if license_name else None


def _run_and_output(path: Path) -> tuple[Path | None, Path]:
    """(the run folder or None, the adapter or model folder) for a run, adapter or model folder."""
    folder = output_folder(path)
    if (path / CONFIG_FILE).is_file() and folder != path:
        return path, folder
    if folder.name in RUN_OUTPUTS and (folder.parent / CONFIG_FILE).is_file():
        return folder.parent, folder
    return None, folder


def card_facts(path: str | Path) -> CardFacts:
    """The facts of the card for a run folder (its adapter/ or model/), an adapter folder or a model folder."""
    run_dir, folder = _run_and_output(Path(path))
    adapter_config = _json(folder / "adapter_config.json")
    if adapter_config is None and not is_model_folder(folder):
        raise LorakitError(f"no adapter found in {path}: expected a run folder (config.yaml with adapter/ or model/), "
                           "an adapter folder (adapter_config.json) or a model folder (config.json)")
    record = read_record(folder)
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) if run_dir else {}
    base = (record.base_model if record else None) or (adapter_config or {}).get("base_model_name_or_path") \
        or ((config or {}).get("model") or {}).get("name_or_path") or "unknown"
    facts = CardFacts(name=run_name(folder), folder=folder, whole_model=adapter_config is None, base_model=str(base),
                      revision=record.revision if record else None, license=base_license(str(base)))
    facts.prompt = dict(record.prompt.__dict__) if record else None
    if adapter_config is not None and not config:
        facts.method = {key: adapter_config[key] for key in ADAPTER_KEYS if key in adapter_config}
    if config:
        shown = {key: value for key, value in config.items() if key != "output_dir"}  # where it ran: a local path
        facts.config_text = yaml.safe_dump(shown, sort_keys=False)
        _run_facts(facts, run_dir, config)
    return facts


def _run_facts(facts: CardFacts, run_dir: Path, config: dict) -> None:
    """Method, data, training settings and results from a run folder's files."""
    method, data, train = config.get("method") or {}, config.get("data") or {}, config.get("train") or {}
    facts.method = dict(method) if isinstance(method, dict) else {"name": method}
    facts.data = {key: data[key] for key in DATA_KEYS if data.get(key) not in (None, "", 0.0)}
    stats = _json(run_dir / DATA_STATS_FILE) or {}
    counts = stats.get("train") or {}
    for label, key in (("training rows", "n_rows"), ("training examples", "n_examples"), ("tokens", "n_tokens"),
                       ("trained tokens", "n_trained_tokens"), ("truncated", "n_truncated")):
        if key in counts:
            facts.data[label] = counts[key]
    if "validation_examples" in stats:
        facts.data["validation examples"] = stats["validation_examples"]
    objective = train.get("objective", "sft")
    facts.training = {key: train[key] for key in (*TRAIN_KEYS, *OBJECTIVE_KEYS.get(objective, ())) if key in train}
    summary = _json(run_dir / SUMMARY_FILE) or {}
    facts.results = {label: summary[key] for key, label in RESULT_LABELS.items() if summary.get(key) is not None}
    records = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
    last_eval = next((r for r in reversed(records) if any(k.startswith("eval_") for k in r)), {})
    facts.results.update({k: v for k, v in last_eval.items() if k.startswith("eval_") and k != "eval_loss"})
    facts.evaluation = _quickstart_scores(_json(run_dir / "report.json"))


def _quickstart_scores(report: Any) -> list[dict[str, Any]]:
    """Base vs tuned rows of the quickstart's report.json (exact match per kind, contains, losses); [] without it."""
    if not isinstance(report, dict) or not all(isinstance(report.get(side), dict) for side in ("base", "tuned")):
        return []
    base, tuned = report["base"], report["tuned"]
    rows = [{"metric": f"exact match: {kind}", "base": (base.get("accuracy") or {}).get(kind), "tuned": value}
            for kind, value in (tuned.get("accuracy") or {}).items()]
    for key, label in (("contains", "contains the answer"), ("qa_loss", "loss on held-out answers"),
                       ("general_loss", "loss on general text")):
        if key in tuned:
            rows.append({"metric": label, "base": base.get(key), "tuned": tuned[key]})
    return rows


# ----------------------------------------------------------------------------- the card


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any], head: str = "setting") -> str:
    lines = [f"| {head} | value |", "|---|---|"]
    return "\n".join(lines + [f"| {key} | {_cell(value)} |" for key, value in rows.items()])


def card_metadata(facts: CardFacts, merged: bool = False) -> dict[str, Any]:
    """The card's front matter: what the Hub indexes the repository by."""
    adapter = not (facts.whole_model or merged)
    method = str(facts.method.get("name") or facts.method.get("peft_type") or "adapter").lower()
    objective = str(facts.training.get("objective", "sft"))
    meta: dict[str, Any] = {}
    if HUB_ID.match(facts.base_model):
        meta["base_model"] = facts.base_model
    meta["library_name"] = "peft" if adapter else "transformers"
    if facts.license:
        meta["license"] = facts.license
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(["lorakit", method, objective, *(["lora"] if "lora" in method else []),
                                       *(["merged"] if merged else [])]))
    return meta


def _usage(facts: CardFacts, repo_id: str, adapter: bool) -> str:
    base_line = ('import lorakit\nbase = lorakit.load_model("embedded")  # the small model inside lorakit: '
                 'pip install lorakit\ntokenizer = lorakit.load_tokenizer("embedded")'
                 if facts.base_model == EMBEDDED_NAME else
                 f'base = AutoModelForCausalLM.from_pretrained("{facts.base_model}")\n'
                 f'tokenizer = AutoTokenizer.from_pretrained("{facts.base_model}")')
    if not adapter:
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```')
    return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'{base_line}\nmodel = PeftModel.from_pretrained(base, "{repo_id}")\n'
            "model = model.merge_and_unload()  # optional: fold the adapter into the weights\n```")


def model_card(facts: CardFacts, repo_id: str, merged: bool = False) -> str:
    """README.md for `repo_id`: front matter, then method, data, training, results, reproduction and usage."""
    adapter = not (facts.whole_model or merged)
    method = facts.method.get("name") or facts.method.get("peft_type") or "adapter"
    what = ("a whole fine-tuned model" if facts.whole_model else
            f"the base with a `{method}` adapter merged into its weights" if merged else f"a `{method}` adapter")
    base = "lorakit's embedded model (`embedded`)" if facts.base_model == EMBEDDED_NAME else f"`{facts.base_model}`"
    parts = ["---\n" + yaml.safe_dump(card_metadata(facts, merged), sort_keys=False) + "---",
             f"# {repo_id.split('/')[-1]}",
             f"{what[0].upper() + what[1:]} for {base}"
             + (f" (revision `{facts.revision}`)" if facts.revision else "")
             + f", trained with lorakit (run `{facts.name}`).",
             "## Method", _table({k: v for k, v in facts.method.items() if v not in (None, [], {})})]
    if facts.data:
        parts += ["## Data", _table(facts.data)]
    if facts.prompt:
        parts += ["Prompt format recorded with the run: "
                  + ", ".join(f"{k} `{v!r}`" for k, v in facts.prompt.items() if v is not None) + "."]
    if facts.training:
        parts += ["## Training", _table(facts.training)]
    if facts.results:
        parts += ["## Results", _table(facts.results, "metric")]
    if facts.evaluation:
        lines = ["| metric | base | tuned |", "|---|---|---|"]
        lines += [f"| {row['metric']} | {_cell(row['base'])} | {_cell(row['tuned'])} |" for row in facts.evaluation]
        parts += ["Held-out evaluation (base model vs tuned):", "\n".join(lines)]
    if facts.config_text:
        parts += ["## Reproduce", "With lorakit installed, save the run's config below as `config.yaml` and run "
                  "`lorakit train config.yaml`.", f"```yaml\n{facts.config_text.rstrip()}\n```"]
    parts += ["## Use it", _usage(facts, repo_id, adapter)]
    return "\n\n".join(parts) + "\n"
