"""Fig. 3 of the paper: training curves of several methods side by side — training loss
(smoothed) and evaluation accuracy against steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from smoothlab.analysis.runs import Run
from smoothlab.errors import UsageError
from smoothlab.figures._common import metrics_by_label, require_frame, smooth
from smoothlab.figures.style import TEXT_WIDTH, distinct_colors, paper_style, savefig

__all__ = ["fig3"]


def _plot_loss(ax_loss, d: pd.DataFrame, color, label: str, smooth_window, logy: bool) -> None:
    """Smoothed training loss of one run over its faint raw curve (finite, > 0 on a log axis)."""
    loss = d[["step", "loss"]].dropna()
    loss = loss[np.isfinite(loss["loss"])]
    if logy:
        loss = loss[loss["loss"] > 0]
    w = max(1, len(loss) // 50) if smooth_window == "auto" else smooth_window
    if w and w > 1:
        ax_loss.plot(loss["step"], loss["loss"], color=color, alpha=0.18, lw=0.5)
    one = len(loss) == 1  # one row: a point, not an empty line
    ax_loss.plot(
        loss["step"], smooth(loss["loss"], w), color=color, label=label, marker="o" if one else None
    )


def _plot_acc(ax_acc, d: pd.DataFrame, acc: str, color, label: str) -> bool:
    """One run's ``acc`` curve; whether it had any recorded value."""
    plotted = False
    if acc in d.columns:
        a = d[["step", acc]].dropna()
        if len(a):
            plotted = True
            ax_acc.plot(
                a["step"],
                a[acc],
                color=color,
                label=label,
                marker="o" if len(a) <= 40 else None,
            )
    return plotted


def fig3(
    runs: Mapping[str, pd.DataFrame] | Sequence[Run],
    out_stem: str | Path,
    smooth_window: int | Literal["auto"] | None = "auto",
    acc: str = "eval_acc",
    logy: bool = False,
) -> list[Path]:
    """Two panels: (a) training loss, (b) ``acc`` (default ``eval_acc``), against step.

    ``runs``: a list of :class:`~smoothlab.analysis.runs.Run` (labelled and colored by method) or
    ``{label: metrics_df}``. ``smooth_window``: rolling mean over that many logged rows;
    ``"auto"`` uses ``max(1, n // 50)`` for a run of ``n`` rows; the raw loss is drawn
    faintly underneath. Runs without any recorded ``acc`` are left out of panel (b).
    Returns the written paths.
    """
    frames, keys = metrics_by_label(runs)
    colors = distinct_colors(keys)
    if not frames:
        raise UsageError("fig3: no runs given")
    for label, df in frames.items():
        require_frame(df, f"fig3: metrics of {label!r}", ("step", "loss"))
    with paper_style():
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(TEXT_WIDTH, 2.2))
        try:
            any_acc = False
            for label, df in frames.items():
                color = colors[label]
                d = df.sort_values("step")
                _plot_loss(ax_loss, d, color, label, smooth_window, logy)
                if _plot_acc(ax_acc, d, acc, color, label):
                    any_acc = True
            if logy:
                ax_loss.set_yscale("log")
            ax_loss.set_xlabel("training step")
            ax_loss.set_ylabel("training loss")
            ax_loss.set_title("(a) training loss", loc="left")
            ax_acc.set_xlabel("training step")
            ax_acc.set_ylabel(acc.replace("_", " "))
            ax_acc.set_title(f"(b) {acc.replace('_', ' ')}", loc="left")
            if not any_acc:
                ax_acc.text(
                    0.5,
                    0.5,
                    f"no {acc} recorded",
                    transform=ax_acc.transAxes,
                    ha="center",
                    va="center",
                    color="0.4",
                )
            handles, labels = ax_loss.get_legend_handles_labels()
            if len(labels) > 1:
                ax_loss.legend(handles, labels, loc="best")
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)
