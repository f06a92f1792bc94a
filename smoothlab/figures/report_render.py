"""Rendering of the report: format-neutral elements (headings, paragraphs, tables, figures)
rendered once to Markdown and once to a self-contained HTML page.

The HTML embeds its figures as ``data:image/png;base64`` URIs and its CSS inline, so the
single file can be mailed or attached as is; the Markdown links the PNGs written next to it.
"""

from __future__ import annotations

import base64
import html
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Report", "format_number", "render_html", "render_md"]


# --------------------------------------------------------------------------- numbers


def format_number(x: Any, digits: int = 4) -> str:
    """Plain-text number formatting used by both renderings.

    Integers (and integer-valued floats below 1e15) get thousands separators
    (``22,713,344``); other floats ``digits`` significant digits, in scientific notation
    outside ``[1e-3, 1e5)`` (``1.234e-05``); NaN/None give an en dash.
    """
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        a = abs(v)
        if 1e-3 <= a < 1e5:
            return f"{v:.{digits}g}"
        mant, exp = f"{v:.{digits - 1}e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return str(x)


def _number_html(x: Any, digits: int = 4) -> str:
    """:func:`format_number` with ``1.23×10<sup>−5</sup>`` and a true minus sign."""
    s = format_number(x, digits)
    m = re.fullmatch(r"(-?[\d.]+)e(-?\d+)", s)
    if m:
        mant, exp = m.groups()
        s = f"{mant}×10<sup>{exp}</sup>"
    return s.replace("-", "−")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


# --------------------------------------------------------------------------- elements


@dataclass
class _Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class _Para:
    text: str  # Markdown-lite: `code` and **bold** only
    css: str = ""


@dataclass
class _Table:
    df: pd.DataFrame
    caption: str = ""
    highlight_row: int | None = None
    row_header: bool = False  # first column is a label column (left, bold)


@dataclass
class _Figure:
    png: Path
    caption: str


@dataclass
class Report:
    title: str
    meta: list[tuple[str, str]]
    elements: list[Any] = field(default_factory=list)
    explained_fit: bool = False

    def h(self, level: int, text: str) -> None:
        """A heading, with an anchor unique in the report (``-2``, ``-3``, ... on a repeat:
        two runs with non-ASCII names both gave ``run``)."""
        base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
        used = {e.anchor for e in self.elements if isinstance(e, _Heading)}
        anchor, k = base, 1
        while anchor in used:
            k += 1
            anchor = f"{base}-{k}"
        self.elements.append(_Heading(level, text, anchor))

    def p(self, text: str, css: str = "") -> None:
        self.elements.append(_Para(text, css))

    def table(self, df: pd.DataFrame, caption: str = "", **kw: Any) -> None:
        self.elements.append(_Table(df, caption, **kw))

    def figure(self, png: Path, caption: str) -> None:
        self.elements.append(_Figure(png, caption))


def _inline_html(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return s


def _cell_md(v: Any) -> str:
    s = format_number(v) if is_number(v) or v is None else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def render_md(rep: Report, out_dir: Path) -> str:
    lines = [f"# {rep.title}", ""]
    for k, v in rep.meta:
        lines.append(f"- **{k}:** {v}")
    lines.append("")
    for el in rep.elements:
        if isinstance(el, _Heading):
            lines += ["#" * (el.level + 1) + " " + el.text, ""]
        elif isinstance(el, _Para):
            lines += [el.text, ""]
        elif isinstance(el, _Table):
            df = el.df
            if el.caption:
                lines += [f"*{el.caption}*", ""]
            cols = [str(c) for c in df.columns]
            lines.append("| " + " | ".join(cols) + " |")
            aligns = []
            for c in df.columns:
                num = len(df) and all(is_number(v) or v is None for v in df[c])
                aligns.append("---:" if num else ":---")
            lines.append("| " + " | ".join(aligns) + " |")
            for _, row in df.iterrows():
                lines.append("| " + " | ".join(_cell_md(v) for v in row.tolist()) + " |")
            lines.append("")
        elif isinstance(el, _Figure):
            rel = el.png.relative_to(out_dir) if el.png.is_relative_to(out_dir) else el.png
            lines += [f"![{el.caption}]({rel.as_posix()})", "", f"*{el.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
:root { --fg:#1f2328; --muted:#5b6470; --line:#d8dde3; --soft:#f5f7f9; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; background:#fff; color:var(--fg);
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", "Helvetica Neue", Arial,
  "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 32px 28px 64px; }
header { border-bottom: 2px solid var(--fg); padding-bottom: 14px; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 10px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 38px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16.5px; margin: 26px 0 8px; }
h4 { font-size: 15px; margin: 20px 0 6px; color: var(--muted); }
p { margin: 8px 0; }
p.note { color: var(--muted); font-size: 13.5px; }
p.warn { background: #fff7e6; border-left: 3px solid #E69F00; padding: 6px 10px; font-size: 13.5px; }
code { font: 13px/1.4 "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace;
  background: var(--soft); padding: 1px 4px; border-radius: 3px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0;
  font-size: 14px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
nav { font-size: 13.5px; color: var(--muted); margin: 10px 0 0; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
.tablewrap { overflow-x: auto; margin: 10px 0 0; }
p.caption { color: var(--muted); font-size: 12.5px; margin: 6px 0 20px; max-width: 760px; }
p.caption b, figcaption b { color: var(--fg); font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); white-space: nowrap; }
thead th { border-bottom: 1.5px solid var(--fg); font-weight: 600; text-align: left;
  vertical-align: bottom; white-space: normal; min-width: 3.5em; }
table.kv td.num { text-align: left; }
th.num, td.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr.best { background: #eaf4fb; font-weight: 600; }
tbody th { font-weight: 600; text-align: left; }
td.text { white-space: normal; max-width: 420px; }
figure { margin: 14px 0 22px; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; max-width: 760px; }
footer { margin-top: 48px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line);
  padding-top: 10px; }
"""


def _png_width(png: Path) -> int | None:
    head = png.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int(struct.unpack(">I", head[16:20])[0])


def _table_html(el: _Table, tab_no: int) -> str:
    """One data table (numbers right-aligned, optional highlighted row) with its caption."""
    df = el.df
    numeric = [bool(len(df)) and all(is_number(v) or v is None for v in df[c]) for c in df.columns]
    kv = " kv" if el.row_header else ""
    parts = [f'<div class="tablewrap"><table class="data{kv}">']
    parts.append("<thead><tr>")
    for c, num in zip(df.columns, numeric, strict=True):
        cls = ' class="num"' if num else ""
        parts.append(f"<th{cls}>{_inline_html(str(c))}</th>")
    parts.append("</tr></thead><tbody>")
    for i, row in enumerate(df.itertuples(index=False)):
        cls = ' class="best"' if el.highlight_row == i else ""
        parts.append(f"<tr{cls}>")
        for j, v in enumerate(row):
            if is_number(v) or v is None:
                parts.append(f'<td class="num">{_number_html(v)}</td>')
            elif el.row_header and j == 0:
                parts.append(f"<th>{html.escape(str(v))}</th>")
            else:
                long = len(str(v)) > 40
                cls = ' class="text"' if long else ""
                parts.append(f"<td{cls}>{_inline_html(str(v))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    if el.caption:
        parts.append(f'<p class="caption"><b>Table {tab_no}.</b> {_inline_html(el.caption)}</p>')
    return "".join(parts)


def _figure_html(el: _Figure, fig_no: int) -> str:
    """One figure, its PNG embedded as base64, with its caption."""
    data = base64.b64encode(el.png.read_bytes()).decode("ascii")
    w = _png_width(el.png)
    width = f' width="{round(w / 200 * 160)}"' if w else ""  # 200 dpi -> 160 css px/in
    return (
        f'<figure><img{width} alt="{html.escape(el.caption)}" '
        f'src="data:image/png;base64,{data}">'
        f"<figcaption><b>Figure {fig_no}.</b> {_inline_html(el.caption)}</figcaption>"
        "</figure>"
    )


def render_html(rep: Report) -> str:
    out: list[str] = []
    fig_no = 0
    tab_no = 0
    toc = [el for el in rep.elements if isinstance(el, _Heading) and el.level == 1]
    for el in rep.elements:
        if isinstance(el, _Heading):
            tag = f"h{el.level + 1}"
            out.append(f'<{tag} id="{el.anchor}">{html.escape(el.text)}</{tag}>')
        elif isinstance(el, _Para):
            cls = f' class="{el.css}"' if el.css else ""
            out.append(f"<p{cls}>{_inline_html(el.text)}</p>")
        elif isinstance(el, _Table):
            tab_no += 1
            out.append(_table_html(el, tab_no))
        elif isinstance(el, _Figure):
            fig_no += 1
            out.append(_figure_html(el, fig_no))
    meta = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rep.meta)
    nav = ""
    if len(toc) > 2:
        nav = (
            "<nav>"
            + "".join(f'<a href="#{el.anchor}">{html.escape(el.text)}</a>' for el in toc)
            + "</nav>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(rep.title)}</title><style>{_CSS}</style></head><body><main>"
        f'<header><h1>{html.escape(rep.title)}</h1><dl class="meta">{meta}</dl>{nav}</header>'
        + "\n".join(out)
        + "<footer>Generated by <code>smoothlab.figures.report.write_report</code> (smoothlab). "
        "Self-contained: figures are embedded.</footer>"
        "</main></body></html>\n"
    )
