"""One self-contained HTML page per run folder (`lorakit report RUN`): inline CSS and SVG, no script, nothing to
fetch, readable offline.

Sections, each from what the run folder holds (a missing file gives a line saying what would fill it):
    loss curves     metrics.jsonl: train loss per logged step and eval loss per evaluation (train/metrics.py's
                    loss figure, as inline SVG: real axes, ticks, labels and a legend)
    evaluation      the eval records of metrics.jsonl and summary.json; the quickstart's report.json, a sweep
                    cell's cell.json
    samples         base vs tuned answers to a few validation prompts (analysis/samples.py, made by the command)
                    and the quickstart's predictions.jsonl
    data            data_stats.json (run.py's `write_data_stats`)
    spectra         spectra.png and spectra.json, when `lorakit inspect` was run on the run (or its adapter)
    parameters      summary.json, and the trainable numbers per module group (analysis/params.py)
    config          config.yaml, a table per section, and the file as saved
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

from lorakit.analysis.html_page import cards, esc, page, scroll, side_by_side, table, text_cell
from lorakit.analysis.spectral import SPECTRA_FIGURE, SPECTRA_TABLE
from lorakit.data.prompting import RUN_OUTPUTS
from lorakit.errors import LorakitError
from lorakit.plotting import figure_svg
from lorakit.run import CONFIG_FILE, DATA_STATS_FILE, REPORT_FILE
from lorakit.train.metrics import METRICS_FILE, SUMMARY_FILE, loss_figure, read_metrics
from lorakit.train.rewards import exact_match

MAX_PREDICTIONS = 500  # rows of the quickstart's predictions.jsonl shown (it has 198)
EVAL_FIELDS = "data.val_fraction (e.g. 0.05), data.val_source or data.val_split"
SECTIONS = (("loss", "Loss curves"), ("evaluation", "Evaluation"), ("samples", "Samples"), ("data", "Data"),
            ("spectra", "Spectra"), ("parameters", "Parameters"), ("config", "Config"))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _config(run_dir: Path) -> dict:
    from lorakit.config import read_yaml

    path = run_dir / CONFIG_FILE
    return read_yaml(path) if path.is_file() else {}


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    """A line of plain words; `text` is HTML (callers escape what they did not write)."""
    return f'<p class="note">{text}</p>'


# ----------------------------------------------------------------------------- sections

def loss_section(records: list[dict], summary: dict | None) -> str:
    """The loss figure and the figures it ends on."""
    if not any(r.get("loss") is not None or r.get("eval_loss") is not None for r in records):
        return _note("metrics.jsonl holds no loss yet: the run has not logged a step.")
    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("eval_loss") is not None]
    figures = [("steps", (summary or {}).get("steps", records[-1].get("step"))),
               ("last train loss", train[-1]["loss"] if train else None),
               (f"train loss at step {train[0]['step']}" if train else "first train loss",
                train[0]["loss"] if train else None),
               ("last eval loss", evals[-1]["eval_loss"] if evals else "none")]
    figure = loss_figure(records, "train and eval loss", size=(9, 4.2), log_y=True)
    return cards(figures) + f'<figure id="loss-chart">{figure_svg(figure)}</figure>'


def _eval_table(evals: list[dict], token_loss: bool) -> str:
    """Every evaluation's numbers; `token_loss`: the eval loss is a mean token loss (SFT), so it has a perplexity."""
    keys = [k for k in dict.fromkeys(k for r in evals for k in r) if k.startswith("eval_")]
    rows = [{"step": r["step"], **{k: r.get(k) for k in keys},
             **({"perplexity": math.exp(min(r["eval_loss"], 700))} if token_loss and "eval_loss" in r else {})}
            for r in evals]
    return scroll(table(rows))


def _quickstart_eval(report: dict) -> str:
    """The quickstart's base vs tuned scores on its held-out questions."""
    base, tuned = report["base"], report["tuned"]
    rows = [{"metric": f"exact match: {kind}", "base": _percent(base.get("accuracy", {}).get(kind)),
             "tuned": _percent(value)} for kind, value in tuned.get("accuracy", {}).items()]
    if "contains" in tuned:
        rows.append({"metric": "contains", "base": _percent(base.get("contains")),
                     "tuned": _percent(tuned["contains"])})
    for key, label in (("qa_loss", "loss on held-out answers"), ("general_loss", "loss on general text (forgetting)")):
        if key in tuned:
            rows.append({"metric": label, "base": base.get(key), "tuned": tuned[key]})
    return "<h3>Held-out questions (quickstart's report.json)</h3>" + table(rows)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def evaluation_section(run_dir: Path, records: list[dict], summary: dict | None, objective: str) -> str:
    """Eval records of the run, the quickstart's and sweep's scores, or the line saying how to get them."""
    parts, blocks = [], []
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    if evals:
        last = next((r for r in reversed(evals) if "eval_loss" in r), {})
        best = (summary or {}).get("best_eval_loss")
        best_label = f"best eval loss (step {summary['best_eval_step']})" if best is not None else "best eval loss"
        parts.append(cards([("last eval loss", last.get("eval_loss")), (best_label, best),
                            ("evaluations", len(evals))]))
        blocks.append("<h3>Every evaluation (metrics.jsonl)</h3>" + _eval_table(evals, token_loss=objective == "sft"))
    report = _read_json(run_dir / "report.json")
    if isinstance(report, dict) and isinstance(report.get("tuned"), dict) and isinstance(report.get("base"), dict):
        blocks.append(_quickstart_eval(report))
    cell = _read_json(run_dir / "cell.json")
    if isinstance(cell, dict):
        flat = [{"metric": k, "value": v} for k, v in cell.items() if not isinstance(v, (dict, list))]
        blocks.append("<h3>Sweep cell (cell.json)</h3>" + table(flat))
    if blocks:
        parts.append(side_by_side(*blocks))
    else:
        parts.append(_note(f"No evaluation recorded: the run had no validation rows. Set {EVAL_FIELDS} to get an "
                           "eval loss after the last step and every <code>train.eval_every</code> steps."))
    parts.append(_note(f"Exact match, contains and loss on the validation rows, per group: "
                       f"<code>lorakit evaluate {esc(run_dir)}</code>."))
    return "\n".join(parts)


def _samples_table(rows: list[dict], columns: tuple[str, ...] = ("prompt", "reference", "base", "tuned")) -> str:
    """Model text side by side, a column each; an answer that matches the reference exactly is marked."""
    def text(row: dict, column: str) -> str:
        answer, reference = str(row.get(column, "")), str(row.get("reference", ""))
        return text_cell(answer, hit=column in ("base", "tuned") and bool(reference) and exact_match(answer, reference))

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(text(row, c) for c in columns) + "</tr>" for row in rows)
    return f'<table class="wide samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def samples_section(run_dir: Path, samples: list[dict] | None, note: str) -> str:
    """Base vs tuned answers made for this page, and the quickstart's recorded predictions."""
    parts = [_note(esc(note))] if note else []
    if samples:
        parts.append(_samples_table(samples))
        parts.append(_note("Greedy answers; a green cell matches the reference exactly (trimmed, case-folded)."))
    elif samples is None and not note:
        parts.append(_note(f"None made: <code>lorakit report {esc(run_dir)} --samples 3</code> answers the first "
                           "validation prompts with the base and the tuned model."))
    path = run_dir / "predictions.jsonl"
    if path.is_file():
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        columns = tuple(c for c in ("prompt", "reference", "base", "tuned") if any(c in row for row in lines))
        recorded = scroll(_samples_table(lines[:MAX_PREDICTIONS], columns), full=True)
        parts.append(f"<details><summary>All {len(lines)} held-out predictions of the quickstart (predictions.jsonl)"
                     f"</summary>{recorded}</details>")
    return "\n".join(parts)


def data_section(run_dir: Path) -> str:
    """Rows, examples, truncation, tokens and the trained share, from data_stats.json."""
    stats = _read_json(run_dir / DATA_STATS_FILE)
    if not isinstance(stats, dict):
        line = next((line[2:] for line in _lines(run_dir / REPORT_FILE) if line.startswith("- data: ")), None)
        recorded = f" report.md says: {esc(line)}" if line else ""
        return _note(f"Not recorded: {DATA_STATS_FILE} is written by runs of this lorakit version.{recorded}")
    train, unit = stats["train"], stats["unit"]
    share = train["n_trained_tokens"] / train["n_tokens"] if train["n_tokens"] else 0.0
    figures = [("training rows", train["n_rows"]), (f"training {unit}", train["n_examples"]),
               ("tokens", train["n_tokens"]), ("trained tokens", train["n_trained_tokens"]),
               ("trained share", f"{100 * share:.1f}%"), ("truncated", train["n_truncated"]),
               (f"validation {unit}", stats["validation_examples"])]
    rows = [{"": "rows read", "count": train["n_rows"]}, {"": f"{unit} kept", "count": train["n_examples"]},
            {"": "bad rows skipped (data.skip_bad_rows)", "count": train["n_skipped_bad_rows"]},
            {"": f"truncated to data.max_length = {stats['max_length']}", "count": train["n_truncated"]},
            {"": "of which the answer was cut", "count": train["n_answers_cut"]},
            {"": "dropped (too long or nothing to train)", "count": train["n_dropped"]},
            {"": "tokens", "count": train["n_tokens"]},
            {"": "tokens per " + unit.rstrip("s"), "count": train["n_tokens"] / max(train["n_examples"], 1)},
            {"": "trained tokens (carry a loss)", "count": train["n_trained_tokens"]}]
    return cards(figures) + "<h3>Training rows</h3>" + table(rows) + _note(
        f"{esc(unit.capitalize())}: what the rows became (preference runs: pairs, counting both answers' tokens; "
        "grpo: prompts, nothing of which is trained).")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def spectra_section(run_dir: Path) -> str:
    """`lorakit inspect`'s figure and table, from the run folder or its output folder."""
    for folder in (run_dir, *(run_dir / output for output in RUN_OUTPUTS)):
        figure, rows = folder / SPECTRA_FIGURE, _read_json(folder / SPECTRA_TABLE)
        if figure.is_file() or rows:
            break
    else:
        return _note(f"Not inspected: <code>lorakit inspect {esc(run_dir)}</code> compares every tuned matrix "
                     "with the base (update size, effective rank, intruder dimensions) and writes the figure and "
                     "table this section shows.")
    parts = []
    if isinstance(rows, dict):
        modules = rows["modules"]
        intruders = sum(m["intruders"] for m in modules)
        mean_rank = sum(m["effective_rank"] for m in modules) / max(len(modules), 1)
        parts.append(cards([("modules compared", len(modules)), ("intruder dimensions", intruders),
                            ("mean effective rank of dW", mean_rank), ("base", rows.get("base", "?"))]))
        parts.append(_note(f"Intruders: of the top {rows.get('top_k')} singular vectors of a tuned matrix, those "
                           f"whose highest |cos| with any base singular vector is below {rows.get('threshold')} "
                           "(Shuttleworth et al. 2024)."))
    if figure.is_file():
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="spectra" src="data:image/png;base64,{data}"></figure>')
    if isinstance(rows, dict):
        parts.append(scroll(table(rows["modules"])))
    return "\n".join(parts)


def _groups(config: dict) -> str:
    """Trainable numbers per module group, counted on the model's skeleton (no weights loaded)."""
    from lorakit.analysis.params import method_count
    from lorakit.config import build_config

    try:
        cfg = build_config(config)
        count = method_count(cfg.model.name_or_path, cfg.method, cfg.model.trust_remote_code)
    except (LorakitError, OSError, ValueError) as error:
        return _note(f"Per module group: not counted ({esc(error)}).")
    rows = [{"module group": name, "trainable": n} for name, n in count.groups.items()]
    return f"<h3>Per module group</h3>{table(rows)}"


def parameters_section(summary: dict | None, config: dict) -> str:
    """What trained and how fast, from summary.json, and the per-group counts."""
    if not summary:
        return _note(f"No {SUMMARY_FILE}: the run has not finished.")
    share = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
    head = cards([("trainable parameters", summary["trainable_params"]), ("all parameters", summary["total_params"]),
                  ("trainable share", f"{share:.4f}%"), ("training time", f"{summary['wall_time_s']:.1f} s"),
                  ("tokens per second", f"{summary['tokens_per_s']:,.0f}"),
                  ("trained tokens", summary["trained_tokens"])])
    rows = [{"": k, "value": v} for k, v in summary.items() if v is not None]
    return (head + _note(f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters trained "
                         f"({share:.4f}%).") + (_groups(config) if config else "")
            + f"<details><summary>{SUMMARY_FILE}</summary>{table(rows)}</details>")


def _value(value: Any) -> str:
    """A config value as the YAML holds it (strings bare; null, true, 32.0, [q_proj, v_proj] as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def config_section(run_dir: Path, config: dict) -> str:
    """The config as a table per section (model and method open), and the file as saved."""
    if not config:
        return _note(f"No {CONFIG_FILE}.")
    scalars = [{"field": k, "value": _value(v)} for k, v in config.items() if not isinstance(v, dict)]
    parts = [table(scalars)] if scalars else []
    for name, fields in config.items():
        if isinstance(fields, dict):
            rows = [{"field": f"{name}.{k}", "value": _value(v)} for k, v in fields.items()]
            opened = " open" if name in ("model", "method") else ""
            parts.append(f"<details{opened}><summary>{esc(name)}</summary>{table(rows)}</details>")
    text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
    parts.append(f'<details><summary>{CONFIG_FILE} as saved</summary><pre class="block">{esc(text)}</pre></details>')
    parts.append(_note(f"Repeat the run: <code>lorakit train {esc(run_dir / CONFIG_FILE)} --name NEW_NAME</code>."))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the page

def _subtitle(config: dict, summary: dict | None) -> str:
    model, method, train = config.get("model", {}), config.get("method", {}), config.get("train", {})
    words = [f"model <code>{esc(model.get('name_or_path', '?'))}</code>"] if model else []
    if method:
        extra = ", ".join(f"{k} {method[k]}" for k in ("r", "alpha", "targets") if k in method)
        words.append(f"method {esc(method.get('name'))}" + (f" ({esc(extra)})" if extra else ""))
    if train:
        words.append(f"objective {esc(train.get('objective', 'sft'))}")
    if summary:
        words.append(f"{summary['steps']:,} steps, {summary['epochs']:.2f} epochs")
    return " · ".join(words)


def render(run_dir: Path, samples: list[dict] | None = None, samples_note: str = "") -> str:
    """The HTML page of a run folder. `samples`: rows of prompt, reference, base and tuned answers
    (analysis/samples.py), or None when none were made; `samples_note`: a line for the samples section."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    summary, config = _read_json(run_dir / SUMMARY_FILE), _config(run_dir)
    objective = config.get("train", {}).get("objective", "sft")
    bodies = {"loss": loss_section(records, summary),
              "evaluation": evaluation_section(run_dir, records, summary, objective),
              "samples": samples_section(run_dir, samples, samples_note), "data": data_section(run_dir),
              "spectra": spectra_section(run_dir), "parameters": parameters_section(summary, config),
              "config": config_section(run_dir, config)}
    body = "\n".join(_section(anchor, title, bodies[anchor]) for anchor, title in SECTIONS)
    return page(f"Run {run_dir.name}", body, subtitle=_subtitle(config, summary), sections=SECTIONS)
