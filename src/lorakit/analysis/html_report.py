"""One self-contained HTML page per run folder: no external URL, readable offline.

The loss curves are drawn by a few lines of inline JavaScript on a <canvas> from the run's own
metrics (embedded as JSON). After drawing, the script counts the canvas's non-background pixels
and writes them to the canvas's `data-ink` attribute (and the number of points to `data-points`),
so a headless browser can check that the chart was really drawn.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from lorakit.train.metrics import METRICS_FILE, SUMMARY_FILE, read_metrics

MAX_SAMPLES = 20

CHART_JS = """
function drawChart(canvas, series) {
  const ctx = canvas.getContext('2d'), W = canvas.width, H = canvas.height, pad = 48;
  ctx.fillStyle = '#ffffff'; ctx.fillRect(0, 0, W, H);
  const pts = series.flatMap(s => s.points);
  if (!pts.length) { canvas.dataset.points = 0; canvas.dataset.ink = 0; return; }
  const logY = pts.every(p => p[1] > 0), f = y => logY ? Math.log10(y) : y;  // losses: log axis
  const xs = pts.map(p => p[0]), ys = pts.map(p => f(p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = x => pad + (x - x0) / (x1 - x0) * (W - 2 * pad), Y = y => H - pad - (f(y) - y0) / (y1 - y0) * (H - 2 * pad);
  const show = v => (logY ? Math.pow(10, v) : v).toPrecision(3);
  ctx.strokeStyle = '#888'; ctx.lineWidth = 1; ctx.strokeRect(pad, pad, W - 2 * pad, H - 2 * pad);
  ctx.fillStyle = '#333'; ctx.font = '12px sans-serif';
  ctx.fillText(show(y1), 4, pad + 4); ctx.fillText(show(y0), 4, H - pad);
  ctx.fillText('step ' + x0, pad, H - pad + 16); ctx.fillText('step ' + x1, W - pad - 60, H - pad + 16);
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    s.points.forEach((p, j) => j ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1])));
    ctx.stroke();
    s.points.forEach(p => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), s.marker, 0, 7); ctx.fill(); });
    ctx.fillText(s.label, W - pad - 120, pad + 16 + 16 * i);
  });
  const data = ctx.getImageData(0, 0, W, H).data;
  let ink = 0;
  for (let k = 0; k < data.length; k += 4) if (data[k] < 250 || data[k + 1] < 250 || data[k + 2] < 250) ink++;
  canvas.dataset.points = pts.length; canvas.dataset.ink = ink;
}
document.querySelectorAll('canvas[data-series]').forEach(c =>
  drawChart(c, JSON.parse(document.getElementById(c.dataset.series).textContent)));
"""

STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
pre{background:#f6f6f6;padding:0.6em;overflow:auto}canvas{border:1px solid #eee}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _json_script(element_id: str, value: Any) -> str:
    text = json.dumps(value).replace("</", "<\\/")  # a '</script>' inside the data cannot end the tag
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def loss_series(records: list[dict]) -> list[dict]:
    """Chart series (train loss line, eval loss points) from metrics.jsonl records."""
    train = [[r["step"], r["loss"]] for r in records if r.get("loss") is not None]
    evals = [[r["step"], r["eval_loss"]] for r in records if r.get("eval_loss") is not None]
    series = [{"label": "train loss", "color": "#1f77b4", "marker": 0, "points": train}]
    if evals:
        series.append({"label": "eval loss", "color": "#d62728", "marker": 3, "points": evals})
    return series


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _samples(run_dir: Path) -> list[dict]:
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:MAX_SAMPLES]


def _sections(run_dir: Path) -> list[str]:
    """The page's sections, in order; a section whose file is missing is left out."""
    parts = []
    summary = _read_json(run_dir / SUMMARY_FILE)
    if summary:
        share = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
        parts.append(f"<h2>Trainable parameters</h2><p>{summary['trainable_params']:,} of "
                     f"{summary['total_params']:,} ({share:.4f}%)</p><h2>Summary</h2>"
                     + _table([{"key": k, "value": v} for k, v in summary.items()]))
    records = read_metrics(run_dir / METRICS_FILE)
    parts.append("<h2>Loss curves</h2>" + _json_script("loss-series", loss_series(records))
                 + '<canvas id="loss-chart" width="720" height="360" data-series="loss-series"></canvas>')
    for name, title in (("report.json", "Evaluation (quickstart)"), ("cell.json", "Evaluation (sweep cell)")):
        data = _read_json(run_dir / name)
        if isinstance(data, dict):
            flat = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
            for key in ("base", "tuned"):
                if isinstance(data.get(key), dict):
                    flat.update({f"{key} {k}": v for k, v in data[key].get("accuracy", {}).items()})
                    flat.update({f"{key} {k}": v for k, v in data[key].items() if isinstance(v, float)})
            parts.append(f"<h2>{title}</h2>" + _table([{"metric": k, "value": v} for k, v in flat.items()]))
    samples = _samples(run_dir)
    if samples:
        parts.append(f"<h2>Sample generations (first {len(samples)})</h2>" + _table(samples))
    config = run_dir / "config.yaml"
    if config.is_file():
        parts.append(f"<h2>Config</h2><pre>{_e(config.read_text(encoding='utf-8'))}</pre>")
    return parts


def render(run_dir: Path) -> str:
    """The HTML page of a run folder."""
    run_dir = Path(run_dir)
    body = "\n".join(_sections(run_dir))
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>lorakit run {_e(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Run <code>{_e(run_dir.name)}</code></h1>\n{body}\n"
            f"<script>{CHART_JS}</script></body></html>\n")
