r"""The paper's Example 2.3: one learning rate cannot serve two blocks of very different
smoothness.

Take :math:`f(x, y) = a x^2 + b y^2` with :math:`a \gg b`, so the blocks are
:math:`L_x = 2a`- and :math:`L_y = 2b`-smooth. Gradient descent with per-block learning
rates is

.. math::  x_{k+1} = x_k - \eta_x \cdot 2a\,x_k = (1 - 2a\eta_x)\,x_k, \qquad
           y_{k+1} = (1 - 2b\eta_y)\,y_k ,

hence :math:`x_k = x_0 (1 - 2a\eta_x)^k` and :math:`y_k = y_0 (1 - 2b\eta_y)^k`.

* One learning rate :math:`\eta_x = \eta_y = \eta` must satisfy :math:`|1 - 2a\eta| < 1`,
  i.e. :math:`\eta < 1/a`, so ``y`` contracts by at best :math:`1 - 2b/a` per step and
  crawls; the best single rate :math:`\eta = 1/(a+b)` gives the rate
  :math:`(a-b)/(a+b)` in both coordinates.
* Two learning rates :math:`\eta_x = 1/(2a) = 1/L_x`, :math:`\eta_y = 1/(2b) = 1/L_y` give
  :math:`x_1 = y_1 = 0`: the minimum in one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from smoothlab.errors import UsageError
from smoothlab.figures.style import PALETTE, TEXT_WIDTH, paper_style, savefig

__all__ = ["GDTrajectory", "example23", "quadratic", "run_gd"]


def quadratic(x: np.ndarray | float, y: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """``f(x, y) = a x² + b y²``."""
    return a * np.square(x) + b * np.square(y)


@dataclass(frozen=True)
class GDTrajectory:
    """Iterates ``x[k], y[k]`` and values ``f[k] = f(x[k], y[k])`` for ``k = 0..steps``."""

    x: np.ndarray
    y: np.ndarray
    f: np.ndarray
    eta_x: float
    eta_y: float


def run_gd(
    a: float,
    b: float,
    eta_x: float,
    eta_y: float,
    x0: float = 1.0,
    y0: float = 1.0,
    steps: int = 50,
) -> GDTrajectory:
    """Gradient descent on ``f(x, y) = a x² + b y²`` with learning rates ``(η_x, η_y)``.

    ``x_{k+1} = x_k − η_x ∂f/∂x = x_k − η_x·2a·x_k`` and
    ``y_{k+1} = y_k − η_y·2b·y_k``, for ``k = 0..steps−1`` (float64). Returns all
    ``steps + 1`` iterates. Divergence is not an error: iterates may grow to ``inf``.
    """
    if steps < 0:
        raise UsageError(f"steps={steps}; expected a non-negative integer")
    if a <= 0 or b <= 0:
        raise UsageError(f"a={a}, b={b}; expected positive curvatures")
    xs = np.empty(steps + 1)
    ys = np.empty(steps + 1)
    xs[0], ys[0] = x0, y0
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(steps):
            gx = 2.0 * a * xs[k]
            gy = 2.0 * b * ys[k]
            xs[k + 1] = xs[k] - eta_x * gx
            ys[k + 1] = ys[k] - eta_y * gy
        fs = quadratic(xs, ys, a, b)
    return GDTrajectory(x=xs, y=ys, f=fs, eta_x=float(eta_x), eta_y=float(eta_y))


def _plot_values(
    ax_f, trajs: list, a: float, b: float, steps: int, f0: float, floor: float
) -> None:
    """Panel (a): f(x_k, y_k) per schedule on a log scale, clipped at ``floor``."""
    k = np.arange(steps + 1)
    for lab, t, c, ls in trajs:
        f = np.maximum(t.f, floor)
        ax_f.plot(k, f, color=c, ls=ls, label=lab, marker="o" if steps <= 12 else None)
    ax_f.set_yscale("log")
    ax_f.set_ylim(floor / 3, f0 * 5)
    ax_f.set_xlabel("iteration $k$")
    ax_f.set_ylabel(r"$f(x_k, y_k)$")
    coef = {c: ("" if v == 1 else f"{v:g}") for c, v in (("a", a), ("b", b))}
    ax_f.set_title(f"(a) $f = {coef['a']}x^2 + {coef['b']}y^2$", loc="left")
    ax_f.annotate(
        "exact minimum\nafter one step",
        xy=(1, floor),
        xytext=(0.3 * steps, floor * 1e2),
        fontsize=7,
        color=PALETTE["vermillion"],
        arrowprops={"arrowstyle": "->", "color": PALETTE["vermillion"], "lw": 0.6},
    )
    ax_f.legend(loc="center right", fontsize=6.5)


def _plot_plane(
    ax_xy, trajs: list, a: float, b: float, x0: float, y0: float, f0: float, shown: int
) -> None:
    """Panel (b): the first ``shown`` iterates over the level sets of f."""
    ext = 1.15 * max(abs(x0), abs(y0))
    gx, gy = np.meshgrid(np.linspace(-ext, ext, 400), np.linspace(-ext, ext, 400))
    levels = np.geomspace(f0 * 1e-4, f0 * 2, 9)
    ax_xy.contour(gx, gy, quadratic(gx, gy, a, b), levels=levels, colors="0.75", linewidths=0.4)
    for lab, t, c, _ls in trajs:
        x, y = t.x[: shown + 1], t.y[: shown + 1]
        ok = np.isfinite(x) & np.isfinite(y) & (np.abs(x) <= ext) & (np.abs(y) <= ext)
        ax_xy.plot(x[ok], y[ok], color=c, marker="o", markersize=2.2, lw=0.7, label=lab)
    ax_xy.plot([0], [0], marker="*", color="black", markersize=6, ls="none")
    ax_xy.plot([x0], [y0], marker="s", color="black", markersize=3, ls="none")
    ax_xy.set_xlim(-ext, ext)
    # iterates stay on y0's side of the x axis (0 <= 1 - 2bη < 1): show that half
    ax_xy.set_ylim((-0.15 * ext, ext) if y0 >= 0 else (-ext, 0.15 * ext))
    ax_xy.set_aspect("equal")
    ax_xy.set_xlabel("$x$ (stiff, $L_x = 2a$)")
    ax_xy.set_ylabel("$y$ (flat, $L_y = 2b$)")
    ax_xy.set_title(f"(b) first {shown} iterates", loc="left")
    ax_xy.grid(False)


def example23(
    out_stem: str | Path,
    a: float = 100.0,
    b: float = 1.0,
    steps: int = 50,
    x0: float = 1.0,
    y0: float = 1.0,
    plane_steps: int = 15,
) -> list[Path]:
    """Plot Example 2.3: (a) ``f(x_k, y_k)`` over iterations ``k`` on a log scale,
    (b) the iterates in the ``(x, y)`` plane over the level sets of ``f``.

    Three schedules: one learning rate ``η = 1/(2a)`` (exact in ``x``, ``y`` shrinks by
    ``1 − b/a`` per step), the best single rate ``η = 1/(a+b)`` (both shrink by
    ``(a−b)/(a+b)``, ``x`` zig-zags), and two rates ``η_x = 1/(2a)``, ``η_y = 1/(2b)``
    (the minimum after one step; drawn at the axis floor since ``log 0 = −∞``). Panel (b)
    shows the first ``plane_steps`` iterates, where the zig-zag is still readable.
    Returns the written paths.
    """
    if not a > b > 0:
        raise UsageError(f"a={a}, b={b}; Example 2.3 needs a > b > 0")
    schedules = [
        (r"one lr $\eta = 1/(2a)$", 1 / (2 * a), 1 / (2 * a), PALETTE["blue"], "-"),
        (r"one lr $\eta = 1/(a+b)$", 1 / (a + b), 1 / (a + b), PALETTE["green"], "--"),
        (
            r"two lrs $\eta_x = 1/(2a)$, $\eta_y = 1/(2b)$",
            1 / (2 * a),
            1 / (2 * b),
            PALETTE["vermillion"],
            "-",
        ),
    ]
    trajs = [(lab, run_gd(a, b, ex, ey, x0, y0, steps), c, ls) for lab, ex, ey, c, ls in schedules]
    f0 = float(quadratic(x0, y0, a, b))
    floor = f0 * 1e-12
    with paper_style():
        fig, (ax_f, ax_xy) = plt.subplots(
            1, 2, figsize=(TEXT_WIDTH, 2.3), gridspec_kw={"width_ratios": [1.1, 1]}
        )
        try:
            _plot_values(ax_f, trajs, a, b, steps, f0, floor)
            shown = min(steps, plane_steps)
            _plot_plane(ax_xy, trajs, a, b, x0, y0, f0, shown)
            fig.tight_layout()
            return savefig(fig, out_stem)
        finally:
            plt.close(fig)
