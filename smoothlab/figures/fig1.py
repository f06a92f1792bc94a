"""Fig. 1 of the paper: local smoothness along a fine-tuning run.

* :func:`fig1a` — ``L(t)`` of one block (by default the whole model) over training steps,
  with a ±1 standard-error band from the estimator.
* :func:`fig1b` — ``L_x(t)`` of the base model and ``L_y(t)`` of the LoRA module on a log
  scale, annotated with the median ratio ``median_t L_x(t)/L_y(t)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from smoothlab.analysis.summary import select_norm, smoothness_ratio
from smoothlab.errors import UsageError
from smoothlab.figures._common import blocks_in, per_step, require_blocks, require_frame
from smoothlab.figures.style import COLUMN_WIDTH, block_color, paper_style, savefig

__all__ = ["fig1a", "fig1b"]

_COLUMNS = ("step", "block", "estimate")


def _ylabel(df: pd.DataFrame) -> str:
    norms = [str(n) for n in pd.unique(df["norm"].dropna())] if "norm" in df else []
    if not norms or norms == ["spectral"]:
        return r"local smoothness $L = \|\nabla^2 f\|_2$"
    return rf"Hessian norm ({', '.join(norms)})"


def _band(ax, d: pd.DataFrame, color: str, label: str) -> None:
    x = d["step"].to_numpy(dtype="float64")
    y = d["estimate"].to_numpy(dtype="float64")
    ax.plot(x, y, color=color, label=label, marker="o" if len(x) < 30 else None)
    se = d["stderr"].to_numpy(dtype="float64")
    if np.isfinite(se).any():
        se = np.where(np.isfinite(se), se, 0.0)
        lo = y - se
        if ax.get_yscale() == "log":
            lo = np.where(lo > 0, lo, y * 0.5)  # keep the band drawable on a log axis
        ax.fill_between(x, lo, y + se, color=color, alpha=0.2, linewidth=0)


def fig1a(
    smoothness_df: pd.DataFrame,
    out_stem: str | Path,
    block: str | None = None,
    norm: str | None = None,
) -> list[Path]:
    """Plot ``L_b(t)`` over steps ``t`` for one block ``b``, with a ``±stderr`` band.

    ``block=None`` picks ``"model"`` when recorded (the whole model as one block), else the
    only block, else the first block recorded. ``norm`` selects the Hessian norm (default:
    the single recorded one, or ``"spectral"``). Several probes at one step are averaged.
    Writes ``<out_stem>.png`` and ``.pdf``; returns their paths.
    """
    df = require_frame(smoothness_df, "fig1a: smoothness frame", _COLUMNS)
    df = select_norm(df, norm)
    found = blocks_in(df)
    if block is None:
        if not found:
            raise UsageError("fig1a: the smoothness frame has no block names")
        block = "model" if "model" in found else found[0]
    require_blocks(df, [block])
    d = per_step(df, block)
    if d.empty:
        raise UsageError(f"fig1a: block {block!r} has no finite estimate")
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
        try:
            _band(ax, d, block_color(block), block)
            ax.set_xlabel("training step")
            ax.set_ylabel(_ylabel(df))
            if block != "model":
                ax.set_title(f"block: {block}", loc="left")
            _scale(ax, d["estimate"].to_numpy(dtype="float64"))
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)


def _scale(ax: Any, values: np.ndarray) -> None:
    """A log axis when every value is positive and they span more than two decades;
    otherwise linear, from 0 when none is negative (a negative trace stays in view)."""
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
        ax.set_yscale("log")
    elif len(finite) and finite.min() >= 0:
        ax.set_ylim(bottom=0)


def fig1b(
    smoothness_df: pd.DataFrame,
    out_stem: str | Path,
    blocks: Sequence[str] = ("base", "peft"),
    labels: Sequence[str] = ("base model (x)", "LoRA module (y)"),
    norm: str | None = None,
) -> list[Path]:
    """Plot ``L_x(t)`` (base model) and ``L_y(t)`` (LoRA module) on a log ``y`` axis.

    ``blocks = (x, y)`` name the two blocks, ``labels`` their legend entries. The panel is
    annotated with ``median_t L_x(t)/L_y(t)`` and its interquartile range
    (:func:`smoothlab.analysis.summary.smoothness_ratio`). Returns the written paths.
    """
    if len(blocks) != 2 or len(labels) != 2:
        raise UsageError(f"fig1b: expected two blocks and two labels, got {blocks}, {labels}")
    df = require_frame(smoothness_df, "fig1b: smoothness frame", _COLUMNS)
    df = select_norm(df, norm)
    require_blocks(df, blocks)
    ratio = smoothness_ratio(df, num=blocks[0], den=blocks[1])
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3))
        try:
            ax.set_yscale("log")
            for b, lab in zip(blocks, labels, strict=True):
                d = per_step(df, b)
                d = d[d["estimate"] > 0]
                if d.empty:
                    raise UsageError(f"fig1b: block {b!r} has no positive estimate")
                _band(ax, d, block_color(b), lab)
            ax.set_xlabel("training step")
            ax.set_ylabel(_ylabel(df))
            # the ratio heads the legend, which matplotlib places where the curves are not
            ax.legend(
                loc="best",
                title=f"median $L_x/L_y$ = {ratio['median']:.3g} "
                f"(IQR {ratio['q25']:.3g}–{ratio['q75']:.3g}, {ratio['n']} probes)",
                title_fontsize=7,
            )
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)
