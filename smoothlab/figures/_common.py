"""Helpers shared by the figure modules: input checks and smoothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from smoothlab.analysis.runs import Run
from smoothlab.errors import UsageError


def require_frame(df: object, what: str, columns: Iterable[str]) -> pd.DataFrame:
    """``df`` as a non-empty DataFrame holding ``columns``, else ``ValueError``."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UsageError(f"{what}: missing column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise UsageError(f"{what}: the frame is empty (no rows); nothing to plot")
    return df


def blocks_in(df: pd.DataFrame) -> list[str]:
    """Blocks of a smoothness frame in order of first appearance."""
    return [str(b) for b in pd.unique(df["block"].dropna())]


def require_blocks(df: pd.DataFrame, blocks: Sequence[str]) -> None:
    """``ValueError`` naming the blocks found when one of ``blocks`` is absent."""
    found = blocks_in(df)
    absent = [b for b in blocks if b not in found]
    if absent:
        raise UsageError(
            f"block(s) {absent} not in the smoothness frame; found {found or 'no blocks'}"
        )


def per_step(df: pd.DataFrame, block: str) -> pd.DataFrame:
    """One block's probes, averaged per step: columns ``step, estimate, stderr``.

    With several probes at one step the standard errors combine as
    ``sqrt(Σ se_i²) / k`` (the standard error of their mean; nan if any se_i is missing).
    """
    g = df[df["block"] == block]
    g = g[np.isfinite(g["estimate"].astype("float64"))]
    se = g["stderr"] if "stderr" in g else pd.Series(np.nan, index=g.index)
    tmp = pd.DataFrame(
        {"step": g["step"], "estimate": g["estimate"], "se2": se.astype("float64") ** 2}
    )
    agg = tmp.groupby("step", sort=True).agg(
        estimate=("estimate", "mean"), se2=("se2", "sum"), k=("estimate", "size")
    )
    agg["stderr"] = np.sqrt(agg["se2"]) / agg["k"]
    # the mean's stderr needs every probe's (sum() skips NaN, as if a missing one were 0)
    has_se = tmp.groupby("step", sort=True)["se2"].count() == agg["k"]
    agg.loc[~has_se, "stderr"] = np.nan
    return agg.reset_index()[["step", "estimate", "stderr"]]


def smooth(y: pd.Series, window: int | None) -> pd.Series:
    """Trailing rolling mean over ``window`` logged rows (``None``/``1``: unchanged)."""
    if window is None or window <= 1:
        return y
    return y.rolling(int(window), min_periods=1).mean()


def metrics_by_label(
    runs: Mapping[str, pd.DataFrame] | Sequence[Run],
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Normalise the runs argument of the curve figures.

    Accepts ``{label: metrics_df}`` (colored by label) or a sequence of
    :class:`~smoothlab.analysis.runs.Run` (labelled and colored by method; the run name is added
    when a method occurs twice). Returns ``(frames, color_keys)``.
    """
    if isinstance(runs, Mapping):
        frames = {str(k): v for k, v in runs.items()}
        return frames, {k: k for k in frames}
    runs = list(runs)
    if not all(isinstance(r, Run) for r in runs):
        raise TypeError("runs: expected a {label: metrics DataFrame} mapping or a list of Run")
    methods = [r.method for r in runs]
    frames, keys = {}, {}
    for r in runs:
        label = r.method if methods.count(r.method) == 1 else f"{r.method} ({r.name})"
        frames[label] = r.metrics
        keys[label] = r.method
    return frames, keys
