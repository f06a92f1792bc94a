"""The smoothness report for one or more run folders: Markdown plus a self-contained HTML page.

The presentation layer: tables come from :mod:`analysis`, figures from this package, and
:mod:`smoothlab.figures.report_render` renders both formats.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smoothlab.analysis.fit import AffineFit, PowerFit, fit_blocks
from smoothlab.analysis.modules import X_PREFIX, Y_PREFIX, module_frame
from smoothlab.analysis.runs import Run, load_runs
from smoothlab.analysis.summary import block_summary, compare_methods, select_norm, smoothness_ratio
from smoothlab.errors import UsageError
from smoothlab.figures.fig1 import fig1a, fig1b
from smoothlab.figures.fig3 import fig3
from smoothlab.figures.fitplot import fig_fit
from smoothlab.figures.modules import fig_module_heatmap, fig_modules
from smoothlab.figures.report_render import Report, format_number, is_number, render_html, render_md

__all__ = ["format_number", "write_report"]


# --------------------------------------------------------------------------- content


def _not_finite(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``frame`` whose ``column`` is missing, nan or infinite."""
    return frame[~np.isfinite(frame[column].to_numpy(dtype="float64"))]


def input_notes(run: Run) -> list[str]:
    """What the report's reader must know about a run's input: the problems found while
    reading its files (:attr:`~smoothlab.analysis.runs.Run.warnings`), a non-finite training loss,
    non-finite smoothness estimates (the tables and figures leave those out), and a run
    that has not finished."""
    notes = list(run.warnings)
    planned = run.config.get("steps")
    done = int(run.metrics["step"].max()) if len(run.metrics) else 0
    if isinstance(planned, int) and done < planned and not (run.path / "summary.json").exists():
        notes.append(
            f"the run has not finished: {done} of {planned} steps logged and no summary.json "
            "(still running, interrupted or crashed; rerunning its command resumes it)"
        )
    sm = run.smoothness
    if len(sm):
        off = _not_finite(sm, "estimate")
        if len(off):
            first = off.iloc[0]
            notes.append(
                f"{len(off)} of {len(sm)} smoothness estimates are missing or not finite and "
                f"are left out of the tables and figures (first: block {first['block']}, step "
                f"{int(first['step'])}, estimate {first['estimate']})"
            )
    m = run.metrics
    bad = _not_finite(m, "loss")
    if len(bad):
        first = bad.iloc[0]
        notes.append(
            f"the training loss is not finite in {len(bad)} of {len(m)} logged rows "
            f"(first: step {int(first['step'])}, loss {first['loss']}): the run diverged "
            "or its loss cells are missing"
        )
    return notes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _slugs(names: Sequence[str]) -> list[str]:
    """One file-name stem per run, distinct even where :func:`_slug` maps two names to one
    (non-ASCII names all become ``run``): later ones get ``-2``, ``-3``, ..."""
    out: list[str] = []
    for name in names:
        base, k = _slug(name), 1
        while (slug := base if k == 1 else f"{base}-{k}") in out:
            k += 1
        out.append(slug)
    return out


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _scalar(v: Any) -> Any:
    if v is None or is_number(v):
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


def _try_figure(rep: Report, make: Callable[[], list[Path]], caption: str, what: str) -> None:
    try:
        paths = make()
    except ValueError as exc:
        rep.p(f"No {what}: {exc}", css="note")
        return
    rep.figure(paths[0], caption)


def _advice_section(rep: Report, run: Run, multi: bool) -> None:
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


def _module_section(rep: Report, sm: pd.DataFrame, stem: Path, level: int) -> None:
    """Per-module curves and heat map when the run recorded per-module blocks."""
    sel = select_norm(sm)
    mf = module_frame(sel)
    if mf.empty:
        return
    rep.h(level, "Per-module smoothness")
    counts = mf.groupby("side")["module"].nunique().to_dict()
    rep.p(
        f"{counts.get('x', 0)} x modules (block names `{X_PREFIX}.<module>`) and "
        f"{counts.get('y', 0)} y modules (`{Y_PREFIX}.<module>`); their per-probe statistics "
        "are rows of the table above."
    )
    _try_figure(
        rep,
        lambda: fig_modules(sel, f"{stem}_modules"),
        "Local smoothness L of each module along the run, log scale: (a) x modules of the "
        "base model, (b) y modules of the PEFT block; light = first layer, dark = last.",
        "per-module figure",
    )
    _try_figure(
        rep,
        lambda: fig_module_heatmap(sel, f"{stem}_modules_heatmap"),
        "log10 L per module (rows, in layer order) and probe step (columns); blank = not probed.",
        "per-module heat map",
    )


def _ratio_text(run: Run, sm: pd.DataFrame) -> tuple[str, str]:
    """The base/peft ratio sentence and its css class."""
    try:
        ratio = smoothness_ratio(sm, "base", "peft")
    except ValueError as exc:
        return f"No base/peft ratio: {exc}", "note"
    text = (
        f"**Median L_base / L_peft = {format_number(ratio['median'])}** "
        f"(interquartile range {format_number(ratio['q25'])} – "
        f"{format_number(ratio['q75'])}, {ratio['n']} probe steps)."
    )
    d_x = run.block_sizes.get("base")
    if not ratio["median"] > 0:
        return (
            text + " It is not positive (some estimates are ≤ 0: a trace or an "
            "indefinite block), so it gives no learning-rate ratio.",
            "note",
        )
    if d_x:
        text += (
            f" With d_x = {format_number(d_x)}, the theory's rates "
            f"η_x ∝ 1/(L_x d_x), η_y ∝ 1/L_y give η_x/η_y ∝ "
            f"{format_number(1.0 / (ratio['median'] * d_x))} (constants aside)."
        )
    return text, ""


def _smoothness_section(rep: Report, run: Run, stem: Path) -> None:
    """Per-block summary table, the base/peft ratio and Fig. 1 of one run."""
    sm = run.smoothness
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
    if not blocks:
        rep.p("No block has a finite smoothness estimate: nothing to plot.", css="note")
        return
    has_pair = "base" in blocks and "peft" in blocks
    if has_pair:
        rep.p(*_ratio_text(run, sm))
        _try_figure(
            rep,
            lambda: fig1b(sm, f"{stem}_fig1b"),
            "Local smoothness of the base model (x) and the LoRA/PEFT module (y) along "
            "the run, log scale; bands are ±1 standard error of the estimator.",
            "base/peft smoothness figure",
        )
    if not has_pair or "model" in blocks:
        block = "model" if "model" in blocks else blocks[0]
        _try_figure(
            rep,
            lambda: fig1a(sm, f"{stem}_fig1a", block=block),
            f"Local smoothness L of block `{block}` over training steps, ±1 standard error.",
            "smoothness-over-steps figure",
        )


def _fit_section(rep: Report, sm: pd.DataFrame, stem: Path, level: int) -> None:
    """The generalized-smoothness fits ``L ≈ L0 + L1·‖∇f‖`` per block, table and figure."""
    rep.h(level, "Smoothness against gradient norm")
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
        return
    table, notes = _fit_display(affine, power)
    if len(table):
        rep.table(
            table,
            "Fits L ≈ L0 + L1·‖∇f‖ (OLS, SE = standard error; p-value of L1 = 0) and L ≈ a·‖∇f‖^b.",
        )
    for n in notes:
        rep.p(f"Not fitted — {n}", css="note")
    if len(table):
        _try_figure(
            rep,
            lambda: fig_fit(sel, f"{stem}_fit"),
            "Probed L against gradient norm per block (darker = later step) with the affine fit.",
            "fit figure",
        )


def _final_loss_text(value: float) -> str:
    """A run's final loss as text: a NaN among logged losses means the run diverged, so it
    is written out (``nan (diverged)``) instead of the en dash that marks a missing value."""
    if isinstance(value, float) and math.isnan(value):
        return "nan (diverged)"
    return format_number(value)


def _curves_section(rep: Report, run: Run, stem: Path, level: int) -> None:
    """Training-curve summary and figure of one run."""
    rep.h(level, "Training curves")
    if run.metrics.empty:
        rep.p("No training metrics recorded (metrics.csv missing or empty).", css="note")
        return
    row = compare_methods([run]).iloc[0]
    rep.p(
        f"{len(run.metrics)} logged rows up to step {format_number(row['last_step'])}; "
        f"final loss {_final_loss_text(row['final_loss'])} (mean of the last ⌈n/10⌉ logged "
        f"losses), best eval accuracy {format_number(row['best_acc'])}, "
        f"{format_number(row['sec_per_step'])} s/step, "
        f"{format_number(row['total_seconds'])} s of training."
    )
    _try_figure(
        rep,
        lambda: fig3([run], f"{stem}_curves"),
        "Training loss (rolling mean over the raw curve in light) and evaluation "
        "accuracy against step.",
        "training-curve figure",
    )


def _run_section(rep: Report, run: Run, fig_dir: Path, multi: bool, slug: str) -> None:
    lvl = 2 if multi else 1
    stem = fig_dir / slug
    if multi:
        rep.h(1, f"Run {run.name}")
        rep.p(f"`{run.path}` — method **{run.method}**, model `{run.model}`, task `{run.task}`.")
    for w in input_notes(run):
        rep.p(f"Warning: {w} (in `{run.path}`).", css="warn")
    rep.h(lvl, "Block smoothness" if not multi else f"Block smoothness: {run.name}")
    if run.smoothness.empty:
        rep.p("No smoothness probes recorded (smoothness.csv missing or empty).", css="note")
    else:
        _smoothness_section(rep, run, stem)
        _module_section(rep, run.smoothness, stem, lvl + 1)
        _fit_section(rep, run.smoothness, stem, lvl + 1)
    _advice_section(rep, run, multi)
    if not multi:
        _curves_section(rep, run, stem, lvl)


def _new_report(runs: Sequence[Run], title: str | None) -> Report:
    """The report with its title, header fields and the input-problem banner."""
    multi = len(runs) > 1
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
    rep = Report(title=title, meta=meta)
    problems = {r.name: input_notes(r) for r in runs}
    if any(problems.values()):
        listed = "; ".join(f"{k}: {len(v)}" for k, v in problems.items() if v)
        rep.p(f"**Input problems** ({listed}): see the warnings in each run's section.", "warn")
    return rep


def _comparison_section(
    rep: Report, runs: Sequence[Run], target_acc: float | None, fig_dir: Path
) -> None:
    """The method-comparison table and Fig. 3 across runs."""
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
    has_rows = [not r.metrics.empty for r in runs]
    show["final loss"] = [
        _final_loss_text(v) if rows else None for v, rows in zip(cmp["final_loss"], has_rows)
    ]
    best = None
    if cmp["best_acc"].notna().any():
        best = int(np.nanargmax(cmp["best_acc"].to_numpy(dtype="float64")))
    rep.table(
        show,
        "Final loss = mean of the last ⌈n/10⌉ logged losses (non-finite if the run diverged "
        "there); s / step = median "
        "training seconds per step (probes excluded). Best eval accuracy highlighted.",
        highlight_row=best,
    )
    with_rows = [r for r in runs if not r.metrics.empty]
    if with_rows:
        _try_figure(
            rep,
            lambda: fig3(with_rows, fig_dir / "comparison_curves"),
            "Training curves by method: (a) training loss, rolling mean over the raw "
            "curve in light; (b) evaluation accuracy.",
            "comparison figure",
        )
    else:
        rep.p("No run has training metrics.", css="note")


def write_report(
    run_dirs: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    title: str | None = None,
    target_acc: float | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` for one or more runs.

    Contents: a header (runs, methods, models, tasks, date); the configuration of each run;
    per run, the per-block smoothness table (:func:`~smoothlab.analysis.summary.block_summary`), the
    base/peft ratio and Fig. 1, per-module curves and a module × step heat map when the run
    recorded per-module blocks (:mod:`smoothlab.analysis.modules`), the fit ``L ≈ L0 + L1·‖∇f‖`` per
    block with its scatter plot, the advisor's proposal and calibration table when present; training curves;
    and, for several runs, the method comparison (:func:`~smoothlab.analysis.summary.compare_methods`,
    ``target_acc`` giving the steps-to-target column) with Fig. 3 across runs.

    ``out_dir`` defaults to the run folder for one run and to ``<parent of the first
    run>/report`` for several. Figures are written (PNG + PDF) to ``out_dir/figures``.
    Returns ``(md_path, html_path)``.

    Input problems (a wrong header, non-numeric cells, a torn last row, duplicate steps, a
    non-finite loss) appear as warnings at the top of the report and in each run's section,
    and as :class:`~smoothlab.runlog.RunLogWarning` on stderr; a header without a required
    column, an empty ``run_dirs`` or a folder without ``config.json`` raise
    :class:`~smoothlab.errors.UsageError`.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise UsageError("write_report: no run folders given")
    runs = load_runs(run_dirs)
    multi = len(runs) > 1
    if out_dir is None:
        first = Path(run_dirs[0])
        out_dir = first.resolve().parent / "report" if multi else first
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    rep = _new_report(runs, title)
    rep.h(1, "Configuration")
    rep.table(_config_table(runs), "Run configuration (config.json).", row_header=True)

    if multi:
        _comparison_section(rep, runs, target_acc, fig_dir)

    for run, slug in zip(runs, _slugs([r.name for r in runs]), strict=True):
        _run_section(rep, run, fig_dir, multi, slug)

    md_path = out / "report.md"
    html_path = out / "report.html"
    md_path.write_text(render_md(rep, out), encoding="utf-8")
    html_path.write_text(render_html(rep), encoding="utf-8")
    return md_path, html_path
