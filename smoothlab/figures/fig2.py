"""Fig. 2 of the paper: training loss with one small learning rate, one large learning
rate, and the hybrid's two learning rates ``(η_x, η_y)``.

Any labelled runs can be drawn; a single learning rate small enough for the stiff block
makes the other crawl, one large enough for the flat block makes the stiff one diverge,
and two learning rates do both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from smoothlab.analysis.runs import Run
from smoothlab.errors import UsageError
from smoothlab.figures._common import metrics_by_label, require_frame, smooth
from smoothlab.figures.style import COLUMN_WIDTH, distinct_colors, paper_style, savefig

__all__ = ["fig2"]


def fig2(
    runs: Mapping[str, pd.DataFrame] | Sequence[Run],
    out_stem: str | Path,
    smooth_window: int | None = None,
    logy: bool = False,
    title: str | None = None,
) -> list[Path]:
    """Training loss ``f(w_t)`` over steps ``t`` for labelled runs, one line each.

    ``runs``: ``{label: metrics_df}`` (e.g. ``{"η = 1e-7": df1, "η = 1e-4": df2,
    "hybrid (η_x, η_y)": df3}``) or a list of :class:`~smoothlab.analysis.runs.Run`.
    ``smooth_window``: trailing rolling mean over that many logged rows (the raw curve is
    drawn faintly underneath). ``logy``: log-scale loss axis. Non-finite losses (a
    diverged run) end the line; the last finite point is marked with ×.
    Returns the written paths.
    """
    frames, keys = metrics_by_label(runs)
    colors = distinct_colors(keys)
    if not frames:
        raise UsageError("fig2: no runs given")
    for label, df in frames.items():
        require_frame(df, f"fig2: metrics of {label!r}", ("step", "loss"))
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3))
        try:
            for label, df in frames.items():
                color = colors[label]
                d = df[["step", "loss"]].sort_values("step")
                finite = np.isfinite(d["loss"].to_numpy(dtype="float64"))
                diverged = not finite.all()
                if diverged:  # stop at the first non-finite loss
                    first_bad = int(np.argmin(finite))
                    d = d.iloc[:first_bad]
                if logy:
                    d = d[d["loss"] > 0]
                if d.empty:
                    continue
                y = smooth(d["loss"], smooth_window)
                if smooth_window and smooth_window > 1:
                    ax.plot(d["step"], d["loss"], color=color, alpha=0.2, linewidth=0.6)
                ax.plot(
                    d["step"],
                    y,
                    color=color,
                    label=label + (" (diverged)" if diverged else ""),
                    marker="o" if len(d) == 1 else None,  # one row: a point, not an empty line
                )
                if diverged:
                    ax.plot(d["step"].iloc[-1], y.iloc[-1], "x", color=color, markersize=5)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel("training loss")
            if title:
                ax.set_title(title, loc="left")
            ax.legend(loc="best")
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)
