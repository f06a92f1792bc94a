"""The smoothness report: Markdown plus a self-contained HTML page for one or more runs.

The HTML embeds its figures as ``data:image/png;base64`` URIs and its CSS inline, so the
single file can be mailed or attached as is; the Markdown links the PNGs written next to
it under ``figures/``. Figures come from the :mod:`figures` package, imported lazily
inside :func:`write_report` (``import analysis`` never imports matplotlib).

The report is assembled as a list of format-neutral elements (headings, paragraphs,
tables, figures), rendered once to Markdown and once to HTML.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.fit import AffineFit, PowerFit, fit_blocks
from analysis.runs import Run, load_runs
from analysis.summary import block_summary, compare_methods, select_norm, smoothness_ratio

__all__ = ["format_number", "write_report"]


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


def _is_number(x: Any) -> bool:
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
class _Report:
    title: str
    meta: list[tuple[str, str]]
    elements: list[Any] = field(default_factory=list)
    explained_fit: bool = False

    def h(self, level: int, text: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
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
    s = format_number(v) if _is_number(v) or v is None else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _render_md(rep: _Report, out_dir: Path) -> str:
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
                num = len(df) and all(_is_number(v) or v is None for v in df[c])
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


def _render_html(rep: _Report) -> str:
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
            df = el.df
            numeric = [
                bool(len(df)) and all(_is_number(v) or v is None for v in df[c]) for c in df.columns
            ]
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
                    if _is_number(v) or v is None:
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
                parts.append(
                    f'<p class="caption"><b>Table {tab_no}.</b> {_inline_html(el.caption)}</p>'
                )
            out.append("".join(parts))
        elif isinstance(el, _Figure):
            fig_no += 1
            data = base64.b64encode(el.png.read_bytes()).decode("ascii")
            w = _png_width(el.png)
            width = f' width="{round(w / 200 * 160)}"' if w else ""  # 200 dpi -> 160 css px/in
            out.append(
                f'<figure><img{width} alt="{html.escape(el.caption)}" '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption><b>Figure {fig_no}.</b> {_inline_html(el.caption)}</figcaption>"
                "</figure>"
            )
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
        + "<footer>Generated by <code>analysis.write_report</code> (smoothlab). "
        "Self-contained: figures are embedded.</footer>"
        "</main></body></html>\n"
    )


# --------------------------------------------------------------------------- content


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _scalar(v: Any) -> Any:
    if v is None or _is_number(v):
        return v
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    return json.dumps(v, separators=(", ", ": "), default=str)


_CONFIG_FIRST = ("method", "model", "task", "seed", "steps", "batch_size", "lr_base", "lr_peft")


def _config_table(runs: Sequence[Run]) -> pd.DataFrame:
    keys: list[str] = list(_CONFIG_FIRST)
    for r in runs:
        for k in r.config:
            if k not in keys and k not in ("block_sizes", "versions", "name"):
                keys.append(k)
    blocks = _unique(b for r in runs for b in r.block_sizes)
    rows: list[list[Any]] = []
    for k in keys:
        if not any(k in r.config for r in runs):
            continue
        rows.append([k, *(_scalar(r.config.get(k)) for r in runs)])
    for b in blocks:
        rows.append([f"d_{b} (parameters)", *(r.block_sizes.get(b) for r in runs)])
    vers = [r.config.get("versions") or {} for r in runs]
    if any(vers):
        rows.append(
            [
                "versions",
                *(", ".join(f"{k} {v}" for k, v in sorted(d.items())) if d else None for d in vers),
            ]
        )
    rows.append(
        [
            "logged rows (metrics / probes)",
            *(f"{len(r.metrics)} / {len(r.smoothness)}" for r in runs),
        ]
    )
    return pd.DataFrame(rows, columns=["setting", *(r.name for r in runs)])


def _summary_display(bs: pd.DataFrame) -> pd.DataFrame:
    show = pd.DataFrame(
        {
            "block": bs["block"],
            "probes": bs["count"].astype(int).tolist(),
            "d_b": bs["d_b"],
            "median L": bs["median"],
            "mean": bs["mean"],
            "min": bs["min"],
            "max": bs["max"],
            "q90": bs["q90"],
            "median stderr": bs["median_stderr"],
            "median ‖∇f‖": bs["median_grad_norm"],
        }
    )
    norms = [n for n in bs["norm"].unique() if n]
    if len(norms) > 1:
        show.insert(1, "norm", bs["norm"])
    return show


def _fit_display(
    affine: dict[str, AffineFit | PowerFit | ValueError],
    power: dict[str, AffineFit | PowerFit | ValueError],
) -> tuple[pd.DataFrame, list[str]]:
    rows, notes = [], []
    for b, fa in affine.items():
        fp = power.get(b)
        if isinstance(fa, ValueError):
            notes.append(str(fa))
            continue
        assert isinstance(fa, AffineFit)
        row: dict[str, Any] = {
            "block": b,
            "n": fa.n,
            "L0": fa.L0,
            "SE(L0)": fa.L0_se,
            "L1": fa.L1,
            "SE(L1)": fa.L1_se,
            "r²": fa.r2,
            "Pearson r": fa.r,
            "p-value": fa.p_value,
        }
        if isinstance(fp, PowerFit):
            row.update({"power b": fp.b, "SE(b)": fp.b_se, "r² (log-log)": fp.r2})
        else:
            row.update({"power b": None, "SE(b)": None, "r² (log-log)": None})
        rows.append(row)
    return pd.DataFrame(rows), notes


def _try_figure(rep: _Report, make: Callable[[], list[Path]], caption: str, what: str) -> None:
    try:
        paths = make()
    except ValueError as exc:
        rep.p(f"No {what}: {exc}", css="note")
        return
    rep.figure(paths[0], caption)


def _advice_section(rep: _Report, run: Run, multi: bool) -> None:
    adv = run.advice
    if adv is None and run.calibration is None:
        return
    rep.h(
        2 if multi else 1,
        f"Learning-rate proposal: {run.name}" if multi else "Learning-rate proposal",
    )
    if adv is not None:
        if adv.get("formula"):
            rep.p(f"Rule: `{adv['formula']}`")
        inputs = [k for k in ("L_x", "L_y", "d_x", "c_x", "c_y") if k in adv]
        outputs = [k for k in ("eta_x", "eta_y", "ratio") if k in adv]
        other = [k for k in adv if k not in (*inputs, *outputs, "formula")]
        if inputs:
            rep.table(
                pd.DataFrame([[_scalar(adv[k]) for k in inputs]], columns=inputs),
                "Advisor inputs: block smoothness L, base dimension d_x, constants c.",
            )
        if outputs:
            rep.table(
                pd.DataFrame([[_scalar(adv[k]) for k in outputs]], columns=outputs),
                "Proposed learning rates (ratio = eta_y / eta_x).",
            )
        if other:
            rep.table(
                pd.DataFrame([[k, _scalar(adv[k])] for k in other], columns=["field", "value"]),
                "Other fields of advice.json.",
                row_header=True,
            )
    cal = run.calibration
    if cal is not None:
        if cal.empty:
            rep.p("calibration.csv has no rows.", css="note")
        else:
            cols = [c for c in cal.columns if cal[c].notna().any()]
            show = cal[cols].astype(object).where(cal[cols].notna(), None)
            best = None
            if "dev_acc" in cal and cal["dev_acc"].notna().any():
                best = int(np.nanargmax(cal["dev_acc"].to_numpy(dtype="float64")))
            rep.table(
                show.reset_index(drop=True),
                "Calibration trials (scales multiply the proposed learning rates); "
                "the best dev accuracy is highlighted.",
                highlight_row=best,
            )


def _run_section(rep: _Report, run: Run, fig_dir: Path, figs: Any, multi: bool) -> None:
    lvl = 2 if multi else 1
    stem = _slug(run.name)
    if multi:
        rep.h(1, f"Run {run.name}")
        rep.p(f"`{run.path}` — method **{run.method}**, model `{run.model}`, task `{run.task}`.")
    for w in run.warnings:
        rep.p(f"Note: {w} in `{run.path}`.", css="warn")

    rep.h(lvl, "Block smoothness" if not multi else f"Block smoothness: {run.name}")
    sm = run.smoothness
    if sm.empty:
        rep.p("No smoothness probes recorded (smoothness.csv missing or empty).", css="note")
    else:
        bs = block_summary(run)
        norms = [n for n in pd.unique(sm["norm"].dropna())]
        hvps = [n for n in pd.unique(sm["hvp"].dropna())]
        rep.p(
            f"{len(sm)} probe rows over {sm['step'].nunique()} steps "
            f"(steps {format_number(int(sm['step'].min()))}–{format_number(int(sm['step'].max()))}); "
            f"norm: {', '.join(map(str, norms)) or 'not recorded'}; "
            f"HVP oracle: {', '.join(map(str, hvps)) or 'not recorded'}."
        )
        rep.table(
            _summary_display(bs),
            "Per-block Hessian norm over probes (spectral norm = local smoothness L); "
            "d_b = parameters in the block.",
        )
        blocks = [str(b) for b in bs["block"].unique()]
        has_pair = "base" in blocks and "peft" in blocks
        if has_pair:
            try:
                ratio = smoothness_ratio(sm, "base", "peft")
            except ValueError as exc:
                rep.p(f"No base/peft ratio: {exc}", css="note")
            else:
                text = (
                    f"**Median L_base / L_peft = {format_number(ratio['median'])}** "
                    f"(interquartile range {format_number(ratio['q25'])} – "
                    f"{format_number(ratio['q75'])}, {ratio['n']} probe steps)."
                )
                d_x = run.block_sizes.get("base")
                if d_x:
                    text += (
                        f" With d_x = {format_number(d_x)}, the theory's rates "
                        f"η_x ∝ 1/(L_x d_x), η_y ∝ 1/L_y give η_x/η_y ∝ "
                        f"{format_number(1.0 / (ratio['median'] * d_x))} (constants aside)."
                    )
                rep.p(text)
            _try_figure(
                rep,
                lambda: figs.fig1b(sm, fig_dir / f"{stem}_fig1b"),
                "Local smoothness of the base model (x) and the LoRA/PEFT module (y) along "
                "the run, log scale; bands are ±1 standard error of the estimator.",
                "base/peft smoothness figure",
            )
        if not has_pair or "model" in blocks:
            block = "model" if "model" in blocks else blocks[0]
            _try_figure(
                rep,
                lambda: figs.fig1a(sm, fig_dir / f"{stem}_fig1a", block=block),
                f"Local smoothness L of block `{block}` over training steps, ±1 standard error.",
                "smoothness-over-steps figure",
            )

        rep.h(lvl + 1, "Smoothness against gradient norm")
        if not rep.explained_fit:
            rep.explained_fit = True
            rep.p(
                "Generalized smoothness (Zhang et al. 2019; Li et al. 2024) posits "
                "L ≤ L0 + L1·‖∇f‖. Per block, least squares of the probed L on the block's "
                "gradient norm; a small r² or an L1 within two SEs of 0 says the block is "
                "plainly L-smooth along the run. The power law L ≈ a·‖∇f‖^b is fitted on logs."
            )
        try:
            sel = select_norm(sm)
            affine = fit_blocks(sel, kind="affine")
            power = fit_blocks(sel, kind="power")
        except ValueError as exc:
            rep.p(f"No fit: {exc}", css="note")
        else:
            table, notes = _fit_display(affine, power)
            if len(table):
                rep.table(
                    table,
                    "Fits L ≈ L0 + L1·‖∇f‖ (OLS, SE = standard error; p-value "
                    "of L1 = 0) and L ≈ a·‖∇f‖^b.",
                )
            for n in notes:
                rep.p(f"Not fitted — {n}", css="note")
            if len(table):
                _try_figure(
                    rep,
                    lambda: figs.fig_fit(sel, fig_dir / f"{stem}_fit"),
                    "Probed L against gradient norm per block (darker = later step) with the "
                    "affine fit.",
                    "fit figure",
                )

    _advice_section(rep, run, multi)

    if not multi:
        rep.h(lvl, "Training curves")
        if run.metrics.empty:
            rep.p("No training metrics recorded (metrics.csv missing or empty).", css="note")
        else:
            cmp = compare_methods([run])
            row = cmp.iloc[0]
            rep.p(
                f"{len(run.metrics)} logged rows up to step {format_number(row['last_step'])}; "
                f"final loss {format_number(row['final_loss'])} (mean of the last 10% of rows), "
                f"best eval accuracy {format_number(row['best_acc'])}, "
                f"{format_number(row['sec_per_step'])} s/step, "
                f"{format_number(row['total_seconds'])} s of training."
            )
            _try_figure(
                rep,
                lambda: figs.fig3([run], fig_dir / f"{stem}_curves"),
                "Training loss (rolling mean over the raw curve in light) and evaluation "
                "accuracy against step.",
                "training-curve figure",
            )


def write_report(
    run_dirs: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    title: str | None = None,
    target_acc: float | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` for one or more runs.

    Contents: a header (runs, methods, models, tasks, date); the configuration of each run;
    per run, the per-block smoothness table (:func:`~analysis.summary.block_summary`), the
    base/peft ratio and Fig. 1, the fit ``L ≈ L0 + L1·‖∇f‖`` per block with its scatter
    plot, the advisor's proposal and calibration table when present; training curves;
    and, for several runs, the method comparison (:func:`~analysis.summary.compare_methods`,
    ``target_acc`` giving the steps-to-target column) with Fig. 3 across runs.

    ``out_dir`` defaults to the run folder for one run and to ``<parent of the first
    run>/report`` for several. Figures are written (PNG + PDF) to ``out_dir/figures``.
    Returns ``(md_path, html_path)``.
    """
    from importlib import import_module

    figs = import_module("figures")  # lazy: keeps `import analysis` free of matplotlib

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("write_report: no run folders given")
    runs = load_runs(run_dirs)
    multi = len(runs) > 1
    if out_dir is None:
        first = Path(run_dirs[0])
        out_dir = first.resolve().parent / "report" if multi else first
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if title is None:
        title = (
            f"Smoothness report: {len(runs)} runs"
            if multi
            else f"Smoothness report: {runs[0].name}"
        )
    meta = [
        ("runs", ", ".join(r.name for r in runs)),
        ("methods", ", ".join(_unique(r.method for r in runs))),
        ("models", ", ".join(_unique(r.model for r in runs))),
        ("tasks", ", ".join(_unique(r.task for r in runs))),
        ("date", now),
    ]
    rep = _Report(title=title, meta=meta)

    rep.h(1, "Configuration")
    rep.table(_config_table(runs), "Run configuration (config.json).", row_header=True)

    if multi:
        rep.h(1, "Method comparison")
        cmp = compare_methods(runs, target_acc=target_acc)
        show = cmp.drop(columns=["model", "task"]).rename(
            columns={
                "last_step": "last step",
                "final_loss": "final loss",
                "best_acc": "best eval acc",
                "final_acc": "final eval acc",
                "steps_to_target": "steps to target"
                if target_acc is None
                else f"steps to acc ≥ {format_number(target_acc)}",
                "sec_per_step": "s / step",
                "total_seconds": "total s",
            }
        )
        if target_acc is None:
            show = show.drop(columns=["steps to target"])
        show = show.astype(object).where(show.notna(), None)
        best = None
        if cmp["best_acc"].notna().any():
            best = int(np.nanargmax(cmp["best_acc"].to_numpy(dtype="float64")))
        rep.table(
            show,
            "Final loss = mean over the last 10% of logged rows; s / step = median "
            "training seconds per step (probes excluded). Best eval accuracy highlighted.",
            highlight_row=best,
        )
        with_rows = [r for r in runs if not r.metrics.empty]
        if with_rows:
            _try_figure(
                rep,
                lambda: figs.fig3(with_rows, fig_dir / "comparison_curves"),
                "Training curves by method: (a) training loss, rolling mean over the raw "
                "curve in light; (b) evaluation accuracy.",
                "comparison figure",
            )
        else:
            rep.p("No run has training metrics.", css="note")

    for run in runs:
        _run_section(rep, run, fig_dir, figs, multi)

    md_path = out / "report.md"
    html_path = out / "report.html"
    md_path.write_text(_render_md(rep, out), encoding="utf-8")
    html_path.write_text(_render_html(rep), encoding="utf-8")
    return md_path, html_path
