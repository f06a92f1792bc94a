"""Per-module local smoothness: ``L`` of each x (base-model) and y (PEFT) module along a run.

* :func:`fig_modules` — two panels, x modules and y modules, one curve ``L_m(t)`` per
  module on a log axis, coloured from light (first layer) to dark (last).
* :func:`fig_module_heatmap` — the same numbers as a module × step heat map of
  ``log10 L`` per side, so twelve or more layers stay readable.

Which block is a module of which side is decided by :func:`smoothlab.analysis.modules.module_side`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps

from smoothlab.analysis.modules import X_PREFIX, Y_PREFIX, module_frame, module_matrix, natural_key
from smoothlab.analysis.summary import select_norm
from smoothlab.errors import UsageError
from smoothlab.figures._common import require_frame
from smoothlab.figures.style import TEXT_WIDTH, paper_style, savefig

__all__ = ["fig_module_heatmap", "fig_modules"]

_SIDES = (("x", "x: base-model modules (ZO)"), ("y", "y: PEFT modules (first order)"))


def _modules_or_raise(df: pd.DataFrame, what: str, x_prefix: str, y_prefix: str) -> pd.DataFrame:
    mf = module_frame(df, x_prefix, y_prefix)
    if mf.empty:
        found = [str(b) for b in pd.unique(df["block"].dropna())][:8]
        raise UsageError(
            f"{what}: no per-module blocks (names '{x_prefix}.<module>' or "
            f"'{y_prefix}.<module>') with a finite estimate; found {found}"
        )
    return mf


def _empty_panel(ax, side: str) -> None:
    ax.text(0.5, 0.5, f"no {side} modules recorded", transform=ax.transAxes, ha="center",
            va="center", color="0.4")  # fmt: skip


def fig_modules(
    smoothness_df: pd.DataFrame,
    out_stem: str | Path,
    x_prefix: str = X_PREFIX,
    y_prefix: str = Y_PREFIX,
    norm: str | None = None,
) -> list[Path]:
    """Two panels of ``L_m(t)`` against step, one curve per module ``m``: (a) x, (b) y.

    Probes of one module at one step are averaged. Modules are ordered by
    :func:`~smoothlab.analysis.modules.natural_key`; the colour runs light to dark in that order and a
    legend names them when a side has at most 8. A side without modules gets a note in its
    panel; ``ValueError`` when neither side has any. Returns the written paths.
    """
    df = require_frame(
        smoothness_df, "fig_modules: smoothness frame", ("step", "block", "estimate")
    )
    mf = _modules_or_raise(select_norm(df, norm), "fig_modules", x_prefix, y_prefix)
    with paper_style():
        fig, axes = plt.subplots(1, 2, figsize=(TEXT_WIDTH, 2.4))
        try:
            for ax, (side, title) in zip(axes, _SIDES):
                ax.set_title(f"({'ab'[side == 'y']}) {title}", loc="left")
                ax.set_xlabel("training step")
                part = mf[mf["side"] == side]
                if part.empty or (part["estimate"] <= 0).all():
                    _empty_panel(ax, side)
                    continue
                ax.set_yscale("log")
                modules = sorted(pd.unique(part["module"]), key=natural_key)
                cmap = colormaps["viridis_r"]
                for i, m in enumerate(modules):
                    d = part[(part["module"] == m) & (part["estimate"] > 0)]
                    color = cmap(0.1 + 0.8 * i / max(1, len(modules) - 1))
                    ax.plot(d["step"], d["estimate"], color=color, lw=0.9, label=m,
                            marker="o" if len(d) < 15 else None, markersize=2)  # fmt: skip
                if len(modules) <= 8:
                    ax.legend(fontsize=6, loc="best")
                else:
                    ax.text(0.98, 0.02, f"{modules[0]} (light) … {modules[-1]} (dark)",
                            transform=ax.transAxes, ha="right", va="bottom", fontsize=6)  # fmt: skip
            axes[0].set_ylabel(r"local smoothness $L_m$")
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)


def fig_module_heatmap(
    smoothness_df: pd.DataFrame,
    out_stem: str | Path,
    x_prefix: str = X_PREFIX,
    y_prefix: str = Y_PREFIX,
    norm: str | None = None,
) -> list[Path]:
    """Heat maps of ``log10 L`` with modules (layers) down and probe steps across, one per
    side that has modules (:func:`~smoothlab.analysis.modules.module_matrix`); unprobed cells and
    L <= 0 are blank (a panel with no positive L says so). ``ValueError`` when no side has modules. Returns the written paths."""
    df = require_frame(
        smoothness_df, "fig_module_heatmap: smoothness frame", ("step", "block", "estimate")
    )
    df = select_norm(df, norm)
    _modules_or_raise(df, "fig_module_heatmap", x_prefix, y_prefix)
    mats = [(s, t, module_matrix(df, s, x_prefix, y_prefix)) for s, t in _SIDES]
    mats = [(s, t, m) for s, t, m in mats if not m.empty]
    height = 0.9 + 0.12 * max(len(m) for _, _, m in mats)
    with paper_style():
        fig, axes = plt.subplots(
            1, len(mats), figsize=(TEXT_WIDTH, min(height, 6.0)), squeeze=False
        )
        try:
            for ax, (_side, title, mat) in zip(axes[0], mats):
                vals = mat.to_numpy(dtype="float64")
                with np.errstate(divide="ignore", invalid="ignore"):
                    logv = np.where(vals > 0, np.log10(vals), np.nan)
                steps = mat.columns.to_numpy(dtype="float64")
                im = ax.imshow(np.ma.masked_invalid(logv), aspect="auto", cmap="magma",
                               interpolation="nearest")  # fmt: skip
                if not np.isfinite(logv).any():  # a log scale shows nothing of L <= 0
                    ax.text(0.5, 0.5, "no positive L to show on a log scale",
                            transform=ax.transAxes, ha="center", va="center", color="0.4")  # fmt: skip
                ticks = np.unique(
                    np.linspace(0, len(steps) - 1, min(6, len(steps))).round().astype(int)
                )
                ax.set_xticks(ticks, [f"{steps[i]:g}" for i in ticks])
                ax.set_yticks(range(len(mat.index)), list(mat.index), fontsize=5.5)
                ax.set_xlabel("training step")
                ax.set_title(title, loc="left")
                ax.grid(False)
                fig.colorbar(im, ax=ax, label=r"$\log_{10} L_m$", shrink=0.9)
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)
