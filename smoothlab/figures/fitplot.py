"""Local smoothness against gradient norm, per block, with the generalized-smoothness fit
``L ≈ L0 + L1·‖∇f‖`` (or ``L ≈ a‖∇f‖^b``) of :mod:`smoothlab.analysis.fit`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from smoothlab.analysis.fit import AffineFit, FitKind, fit_blocks
from smoothlab.analysis.summary import select_norm
from smoothlab.figures._common import blocks_in, require_blocks, require_frame
from smoothlab.figures.style import COLUMN_WIDTH, TEXT_WIDTH, block_color, paper_style, savefig

__all__ = ["fig_fit"]


def _short_reason(exc: ValueError, n: int) -> str:
    """A panel-sized version of a fit error (the report prints the full message)."""
    if n < 3:
        return f"no fit: {n} point{'s' if n != 1 else ''}, need ≥ 3"
    if "equal" in str(exc):
        return "no fit: constant ‖∇f‖"
    return "no fit"


def _scatter_by_step(ax, g: pd.DataFrame, color) -> None:
    """Estimate against gradient norm, fill shade = step, edge = the block's color."""
    if not len(g):
        return
    # fill shade = step; start the grey ramp below the first step so that
    # early points are light grey, not invisible white
    span = max(1.0, float(np.ptp(g["step"])))
    ax.scatter(
        g["grad_norm"],
        g["estimate"],
        c=g["step"],
        cmap="Greys",
        vmin=float(g["step"].min()) - 0.3 * span,
        vmax=float(g["step"].max()),
        s=9,
        edgecolors=color,
        linewidths=0.5,
    )


def _draw_fit(ax, g: pd.DataFrame, fit, kind: FitKind, color) -> None:
    """The fitted curve with its slope and r² (or, for a failed fit, the short reason)."""
    if isinstance(fit, ValueError):
        ax.text(
            0.5,
            0.9,
            _short_reason(fit, len(g)),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=6.5,
            color="0.35",
        )
        return
    xs = g["grad_norm"].to_numpy(dtype="float64")
    if kind == "power":  # the points the power fit used: a log-log line needs g > 0
        xs = xs[(xs > 0) & (g["estimate"].to_numpy(dtype="float64") > 0)]
    lo, hi = float(np.nanmin(xs)), float(np.nanmax(xs))
    grid = np.geomspace(lo, hi, 100) if kind == "power" else np.linspace(lo, hi, 100)
    ax.plot(grid, fit.predict(grid), color=color, lw=1.0)
    extra = (
        f"$L_1$ = {fit.L1:.3g} ± {fit.L1_se:.2g}"
        if isinstance(fit, AffineFit)
        else f"$b$ = {fit.b:.3g} ± {fit.b_se:.2g}"
    )
    ax.text(
        0.03,
        0.97,
        f"{extra}\n$r^2$ = {fit.r2:.2f}, n = {fit.n}",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=6.5,
    )


def fig_fit(
    smoothness_df: pd.DataFrame,
    out_stem: str | Path,
    blocks: Sequence[str] | None = None,
    kind: FitKind = "affine",
    norm: str | None = None,
    max_cols: int = 4,
) -> list[Path]:
    """Scatter of ``L_b(t)`` against ``‖∇_b f(w_t)‖``, one panel per block, points colored
    by step (light = early, dark = late), with the fitted line and its ``r²``.

    A block that cannot be fitted (fewer than 3 points, constant gradient norm) gets its
    points and the reason instead of a line. Power fits are drawn on log-log axes.
    Returns the written paths.
    """
    df = require_frame(
        smoothness_df, "fig_fit: smoothness frame", ("step", "block", "estimate", "grad_norm")
    )
    df = select_norm(df, norm)
    if blocks is None:
        blocks = blocks_in(df)
    require_blocks(df, blocks)
    fits = fit_blocks(df, kind=kind, blocks=blocks)
    n = len(blocks)
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    width = COLUMN_WIDTH if n == 1 else TEXT_WIDTH
    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, 2.0 * nrows + 0.1), squeeze=False)
        try:
            for ax in axes.flat[n:]:
                ax.set_visible(False)
            for i, (ax, b) in enumerate(zip(axes.flat, blocks, strict=False)):
                g = df[df["block"] == b][["step", "grad_norm", "estimate"]].dropna()
                color = block_color(b)
                _scatter_by_step(ax, g, color)
                if kind == "power":
                    ax.set_xscale("log")
                    ax.set_yscale("log")
                _draw_fit(ax, g, fits[b], kind, color)
                ax.set_title(b, loc="left")
                ax.set_xlabel(r"$\|\nabla_b f\|$")
                ax.set_ylabel(r"$L_b$" if i % ncols == 0 else "")
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)
