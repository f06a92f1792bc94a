"""Summaries of run folders: per-block smoothness, smoothness ratios, method comparison."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from smoothlab.analysis.runs import Run
from smoothlab.errors import UsageError
from smoothlab.runlog import final_loss

__all__ = [
    "block_summary",
    "compare_methods",
    "select_norm",
    "smoothness_ratio",
]

BLOCK_SUMMARY_COLUMNS: tuple[str, ...] = (
    "block",
    "norm",
    "count",
    "d_b",
    "median",
    "mean",
    "min",
    "max",
    "q90",
    "median_stderr",
    "median_grad_norm",
)


def _frame_and_sizes(
    smoothness: pd.DataFrame | Run, block_sizes: Mapping[str, int] | None
) -> tuple[pd.DataFrame, dict[str, int]]:
    if isinstance(smoothness, Run):
        sizes = dict(smoothness.block_sizes)
        if block_sizes:
            sizes.update(block_sizes)
        return smoothness.smoothness, sizes
    if not isinstance(smoothness, pd.DataFrame):
        raise TypeError(
            f"expected a smoothness DataFrame or a Run, got {type(smoothness).__name__}"
        )
    return smoothness, dict(block_sizes or {})


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UsageError(f"{what}: missing column(s) {missing}; found {list(df.columns)}")


def _blocks_found(df: pd.DataFrame) -> list[str]:
    return [str(b) for b in pd.unique(df["block"].dropna())] if "block" in df else []


def select_norm(smoothness: pd.DataFrame, norm: str | None = None) -> pd.DataFrame:
    """Rows of ``smoothness`` measured with one Hessian norm.

    With ``norm=None``: all rows when the file holds a single norm (or no ``norm``
    column); when it holds several, the ``"spectral"`` rows (the local smoothness ``L``),
    and a ``ValueError`` naming the norms when there are none.
    """
    if "norm" not in smoothness.columns or smoothness["norm"].isna().all():
        if norm is not None:
            raise UsageError(f"norm={norm!r} requested but the frame records no norm")
        return smoothness
    norms = [str(n) for n in pd.unique(smoothness["norm"].dropna())]
    if norm is None:
        if len(norms) <= 1:
            return smoothness
        if "spectral" in norms:
            return smoothness[smoothness["norm"] == "spectral"]
        raise UsageError(f"several norms recorded {norms}; pass norm= one of them")
    if norm not in norms:
        raise UsageError(f"norm={norm!r} not recorded; found {norms}")
    return smoothness[smoothness["norm"] == norm]


def block_summary(
    smoothness: pd.DataFrame | Run,
    block_sizes: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Per-block statistics of the recorded Hessian norms ``L_b(t)`` over probes ``t``.

    One row per ``(block, norm)``, blocks in order of first appearance, with columns
    ``block, norm, count, d_b, median, mean, min, max, q90, median_stderr,
    median_grad_norm``:

    * ``count`` = number of probes with a finite estimate,
    * ``median, mean, min, max`` of ``{L_b(t)}_t``; ``q90`` its 0.9 quantile (linear
      interpolation between order statistics),
    * ``median_stderr`` = median over probes of the estimator's standard error,
    * ``median_grad_norm`` = median over probes of ``‖∇_b f‖``,
    * ``d_b`` = the block's number of parameters, from ``block_sizes`` (or the run's
      ``config["block_sizes"]`` when a :class:`~smoothlab.analysis.runs.Run` is passed), else NaN.

    An empty frame gives an empty summary with these columns.
    """
    df, sizes = _frame_and_sizes(smoothness, block_sizes)
    _require(df, ("block", "estimate"), "smoothness frame")
    df = df[np.isfinite(pd.to_numeric(df["estimate"], errors="coerce"))]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in BLOCK_SUMMARY_COLUMNS})
    if "norm" not in df.columns:
        df = df.assign(norm="")
    df = df.assign(norm=df["norm"].fillna(""))
    rows: list[dict[str, Any]] = []
    for (block, norm), g in df.groupby(["block", "norm"], sort=False):
        est = g["estimate"].astype("float64")
        stderr = g["stderr"] if "stderr" in g else pd.Series(dtype="float64")
        grad = g["grad_norm"] if "grad_norm" in g else pd.Series(dtype="float64")
        rows.append(
            {
                "block": str(block),
                "norm": str(norm),
                "count": int(est.size),
                "d_b": float(sizes[block]) if block in sizes else math.nan,
                "median": float(est.median()),
                "mean": float(est.mean()),
                "min": float(est.min()),
                "max": float(est.max()),
                "q90": float(est.quantile(0.9)),
                "median_stderr": float(stderr.median()) if stderr.notna().any() else math.nan,
                "median_grad_norm": float(grad.median()) if grad.notna().any() else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=list(BLOCK_SUMMARY_COLUMNS))


def smoothness_ratio(
    smoothness: pd.DataFrame | Run,
    num: str = "base",
    den: str = "peft",
    norm: str | None = None,
) -> dict[str, Any]:
    """Median over probe steps of ``r(t) = L_num(t) / L_den(t)``, with its spread.

    Several probes of one block at one step are averaged first; steps where either block
    is missing or ``L_den(t) <= 0`` are skipped. Returns a dict with ``num, den, norm,
    n`` (number of steps used), ``median``, ``q25``, ``q75`` (quartiles of ``r``) and
    ``iqr = q75 - q25``.

    Raises ``ValueError`` when a block is absent (naming the blocks found) or the two
    blocks share no step.
    """
    df, _ = _frame_and_sizes(smoothness, None)
    _require(df, ("step", "block", "estimate"), "smoothness frame")
    df = select_norm(df, norm)
    found = _blocks_found(df)
    for b in (num, den):
        if b not in found:
            raise UsageError(f"block {b!r} not in the smoothness frame; found {found}")
    used_norm = (
        str(df["norm"].dropna().iloc[0]) if "norm" in df and df["norm"].notna().any() else ""
    )
    wide = (
        df[df["block"].isin([num, den])]
        .groupby(["step", "block"])["estimate"]
        .mean()
        .unstack("block")
    )
    wide = wide[(wide[den] > 0) & wide[num].notna()]
    ratio = (wide[num] / wide[den]).to_numpy(dtype="float64")
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        raise UsageError(
            f"blocks {num!r} and {den!r} share no probe step with a positive {den!r} estimate"
        )
    q25, med, q75 = (float(v) for v in np.quantile(ratio, [0.25, 0.5, 0.75]))
    return {
        "num": num,
        "den": den,
        "norm": used_norm,
        "n": int(ratio.size),
        "median": med,
        "q25": q25,
        "q75": q75,
        "iqr": q75 - q25,
    }


COMPARE_COLUMNS: tuple[str, ...] = (
    "run",
    "method",
    "model",
    "task",
    "lr_base",
    "lr_peft",
    "last_step",
    "final_loss",
    "best_acc",
    "final_acc",
    "steps_to_target",
    "sec_per_step",
    "total_seconds",
)


def _cfg_float(config: Mapping[str, Any], key: str) -> float:
    v = config.get(key)
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def compare_methods(
    runs: Iterable[Run],
    target_acc: float | None = None,
    acc: str = "eval_acc",
) -> pd.DataFrame:
    """One row per run, comparing training outcomes.

    Columns ``run, method, model, task, lr_base, lr_peft`` (from the config), and from
    ``metrics.csv`` with logged rows ``i = 1..n``:

    * ``last_step`` = the last logged step,
    * ``final_loss`` = :func:`smoothlab.runlog.final_loss` of the logged losses: the mean
      over the last ``⌈n/10⌉`` rows, NaN/inf propagating (a diverged run is not hidden),
    * ``best_acc`` = ``max_i acc_i``, ``final_acc`` = the last recorded ``acc``
      (``acc`` is the column, ``"eval_acc"`` by default),
    * ``steps_to_target`` = the first step with ``acc >= target_acc`` (NaN when never
      reached or no target is given),
    * ``sec_per_step`` = ``median_i (s_{i+1} - s_i) / (step_{i+1} - step_i)`` over
      consecutive logged rows (``s`` = cumulative seconds; equals the median of the
      differences of ``seconds`` when every step is logged),
    * ``total_seconds`` = the last recorded ``seconds``.

    Empty metrics give NaN in the metric columns.
    """
    rows = []
    for run in runs:
        m = run.metrics
        row: dict[str, Any] = {
            "run": run.name,
            "method": run.method,
            "model": run.model,
            "task": run.task,
            "lr_base": _cfg_float(run.config, "lr_base"),
            "lr_peft": _cfg_float(run.config, "lr_peft"),
        }
        if acc not in m.columns:
            raise UsageError(f"acc={acc!r} is not a metrics column; found {list(m.columns)}")
        m = m.sort_values("step", kind="stable")
        accs = m[["step", acc]].dropna()
        secs = m[["step", "seconds"]].dropna()
        row["last_step"] = float(m["step"].iloc[-1]) if len(m) else math.nan
        row["final_loss"] = final_loss(m["loss"].tolist())
        row["best_acc"] = float(accs[acc].max()) if len(accs) else math.nan
        row["final_acc"] = float(accs[acc].iloc[-1]) if len(accs) else math.nan
        row["steps_to_target"] = math.nan
        if target_acc is not None and len(accs):
            hit = accs[accs[acc] >= target_acc]
            if len(hit):
                row["steps_to_target"] = float(hit["step"].iloc[0])
        if len(secs) >= 2:
            dstep = np.diff(secs["step"].to_numpy(dtype="float64"))
            dsec = np.diff(secs["seconds"].to_numpy(dtype="float64"))
            ok = dstep > 0
            row["sec_per_step"] = float(np.median(dsec[ok] / dstep[ok])) if ok.any() else math.nan
        else:
            row["sec_per_step"] = math.nan
        row["total_seconds"] = float(secs["seconds"].iloc[-1]) if len(secs) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
