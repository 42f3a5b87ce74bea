"""The pieces every lorakit HTML page is made of (the run report, the compare page): one stylesheet, a page
shell, tables, cards and text blocks. Pages are self-contained: inline CSS, no script, nothing to fetch.

Long model outputs wrap anywhere (a repeated token with no space included) and scroll inside their cell past a
maximum height, so one runaway answer never pushes the next column off screen or the page to miles of scrolling.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

STYLE = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--accent:#0969da;--hit:#dafbe1}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#fff;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:76rem;margin:0 auto;padding:1.2rem 2rem 4rem}
header h1{margin:0;font-size:1.6rem}header p{margin:.2rem 0 0;color:var(--muted)}
nav{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:.2rem 1.2rem;padding:.5rem 2rem;
 background:#fffffff0;border-bottom:1px solid var(--line);font-size:.9rem}
nav a,a{color:var(--accent);text-decoration:none}
section{margin-top:2.2rem}
h2{margin:0 0 .6rem;font-size:1.25rem;border-bottom:1px solid var(--line);padding-bottom:.3rem}
h3{margin:1.2rem 0 .4rem;font-size:1rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(11rem,1fr));gap:.7rem;margin:.8rem 0}
.card{border:1px solid var(--line);border-radius:8px;padding:.55rem .8rem;background:var(--soft)}
.card .k{font-size:.8rem;color:var(--muted)}.card .v{font-size:1.15rem;font-weight:600;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.4rem 0;font-size:.9rem}
th,td{border:1px solid var(--line);padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.wide{width:100%;table-layout:fixed}
.out{margin:0;max-height:14rem;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;
 font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
td.hit{background:var(--hit)}
.scroll{display:inline-block;max-width:100%;max-height:26rem;overflow:auto;border:1px solid var(--line);
 border-radius:6px;vertical-align:top}.scroll.full{display:block}
.scroll table{margin:0}.scroll th{position:sticky;top:0}
.row{display:flex;flex-wrap:wrap;gap:.4rem 2rem;align-items:flex-start}
.note{color:var(--muted)}
code{background:var(--soft);padding:.1em .3em;border-radius:4px;font-size:.9em;overflow-wrap:anywhere}
details{border:1px solid var(--line);border-radius:6px;padding:.35rem .8rem;margin:.5rem 0}
summary{cursor:pointer;font-weight:600}
pre.block{background:var(--soft);padding:.8rem;overflow:auto;font-size:13px}
figure{margin:.4rem 0}figure svg,figure img{display:block;max-width:100%;height:auto}
"""


def esc(value: Any) -> str:
    """`value` as HTML text."""
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """A number for a table: floats to 4 significant digits, integers with thousands separators."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, css: str = "") -> str:
    """An HTML table, one row per dict (numbers right-aligned); `columns` default: every key, in order."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def cell(value: Any) -> str:
    """One table cell: a number right-aligned, anything else as text."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{esc(fmt(value))}</td>' if numeric else f"<td>{esc(fmt(value))}</td>"


def text_cell(text: str, *, hit: bool = False) -> str:
    """A table cell holding model text: wrapped anywhere, scrolling past a maximum height."""
    return f'<td{" class=hit" if hit else ""}><div class="out">{esc(text)}</div></td>'


def cards(items: Sequence[tuple[str, Any]]) -> str:
    """Key figures as a grid of small cards: (label, value)."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(fmt(v))}</div></div>' for k, v in items
    ) + "</div>"


def scroll(inner: str, *, full: bool = False) -> str:
    """`inner` in a box that scrolls past a maximum height (long tables); `full`: as wide as the page."""
    return f'<div class="scroll{" full" if full else ""}">{inner}</div>'


def side_by_side(*blocks: str) -> str:
    """Blocks next to each other, wrapping below one another on a narrow window."""
    return '<div class="row">' + "".join(f"<div>{block}</div>" for block in blocks) + "</div>"


def page(title: str, body: str, *, subtitle: str = "", sections: Sequence[tuple[str, str]] = ()) -> str:
    """A whole HTML document: `sections` (anchor, label) become the sticky navigation bar."""
    nav = ("<nav>" + "".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label in sections) + "</nav>"
           if sections else "")
    lead = f"<p>{subtitle}</p>" if subtitle else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>{nav}<main><header><h1>{esc(title)}</h1>{lead}</header>\n"
            f"{body}\n</main></body></html>\n")
