"""Fits of the local smoothness against the gradient norm.

Generalized smoothness (Zhang et al. 2019, "Why gradient clipping accelerates training";
Li et al. 2024, "Convex and non-convex optimization under generalized smoothness") posits

.. math::  L(w) \\le L_0 + L_1 \\, \\lVert \\nabla f(w) \\rVert ,

so along a training trajectory the measured block smoothness ``L_b(t)`` is regressed on
the block gradient norm ``g_b(t) = ‖∇_b f(w_t)‖`` by ordinary least squares:

.. math::  (\\hat L_0, \\hat L_1) = \\arg\\min \\sum_t (L_b(t) - L_0 - L_1 g_b(t))^2 .

``L_1 ≈ 0`` (with a small ``r²``) says the block is plainly ``L``-smooth along the run;
a significant ``L_1 > 0`` says the curvature grows with the gradient. The power-law
alternative fits ``L ≈ a g^b``, i.e. ``log L = log a + b log g``, by least squares on
the logs.

>>> fit = fit_smoothness([1.0, 2.0, 3.0], [5.0, 7.0, 9.0])
>>> round(fit.L0, 12), round(fit.L1, 12), round(fit.r2, 12)
(3.0, 2.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from smoothlab.errors import UsageError

__all__ = [
    "AffineFit",
    "PowerFit",
    "fit_blocks",
    "fit_smoothness",
    "fit_table",
]

FitKind = Literal["affine", "power"]


@dataclass(frozen=True)
class AffineFit:
    """Least-squares fit ``L ≈ L0 + L1·g``.

    ``L0_se``, ``L1_se``: standard errors of the coefficients (classical OLS, residual
    variance ``σ̂² = RSS/(n−2)``, see :func:`_ols`). ``r2 = r²`` is the coefficient of determination, ``r``
    Pearson's correlation between ``g`` and ``L``, ``p_value`` the two-sided p-value of
    ``H0: L1 = 0`` (t test with ``n−2`` degrees of freedom), ``n`` the number of points.
    """

    L0: float
    L1: float
    L0_se: float
    L1_se: float
    r2: float
    r: float
    p_value: float
    n: int
    kind: str = "affine"

    def predict(self, grad_norm: float | np.ndarray) -> np.ndarray:
        """``L0 + L1·g``."""
        return self.L0 + self.L1 * np.asarray(grad_norm, dtype="float64")

    @property
    def formula(self) -> str:
        """The fitted law as text, e.g. ``L ≈ 3.1 + 0.52·‖∇f‖``."""
        sign = "+" if self.L1 >= 0 else "−"
        return f"L ≈ {self.L0:.4g} {sign} {abs(self.L1):.4g}·‖∇f‖"


@dataclass(frozen=True)
class PowerFit:
    """Least-squares fit on logs, ``log L ≈ log a + b·log g``, i.e. ``L ≈ a·g^b``.

    ``log_a_se``, ``b_se``: standard errors of ``log a`` and ``b`` (natural log). ``r2``,
    ``r``, ``p_value`` refer to the regression in log-log space (``H0: b = 0``). Only
    points with ``g > 0`` and ``L > 0`` enter; ``n`` counts them.
    """

    a: float
    b: float
    log_a_se: float
    b_se: float
    r2: float
    r: float
    p_value: float
    n: int
    kind: str = "power"

    def predict(self, grad_norm: float | np.ndarray) -> np.ndarray:
        """``a·g^b``."""
        return self.a * np.asarray(grad_norm, dtype="float64") ** self.b

    @property
    def formula(self) -> str:
        """The fitted law as text, e.g. ``L ≈ 2.3·‖∇f‖^0.41``."""
        return f"L ≈ {self.a:.4g}·‖∇f‖^{self.b:.3g}"


def _clean(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, positive: bool):
    x = np.asarray(x, dtype="float64").ravel()
    y = np.asarray(y, dtype="float64").ravel()
    if x.shape != y.shape:
        raise UsageError(f"grad_norm and estimate differ in length: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    if positive:
        ok &= (x > 0) & (y > 0)
    return x[ok], y[ok], int(x.size)


@dataclass(frozen=True)
class _OLS:
    intercept: float
    slope: float
    intercept_se: float
    slope_se: float
    r: float
    r2: float
    p_value: float


def _ols(x: np.ndarray, y: np.ndarray) -> _OLS:
    """Simple least squares ``y ≈ β0 + β1 x`` with classical standard errors.

    ``β1 = S_xy / S_xx``, ``β0 = ȳ − β1 x̄``, ``σ̂² = Σ e_i² / (n − 2)``,
    ``SE(β1) = σ̂ / √S_xx``, ``SE(β0) = σ̂ √(1/n + x̄²/S_xx)``, ``r = S_xy / √(S_xx S_yy)``,
    ``r² = 1 − RSS/S_yy``, p-value of ``β1 = 0`` from Student's t with ``n − 2`` dof.
    The SEs come from the residuals themselves (not from ``1 − r²``, which cancels
    catastrophically near a perfect fit), so noiseless data give SEs at rounding level.
    """
    n = x.size
    if np.ptp(x) == 0:
        raise UsageError(
            f"cannot fit: all {n} gradient norms are equal ({x[0]:.4g}); the slope is undetermined"
        )
    xm, ym = x.mean(), y.mean()
    dx, dy = x - xm, y - ym
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    slope = sxy / sxx
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    rss = float(resid @ resid)
    s2 = rss / (n - 2) if n > 2 else math.nan
    slope_se = math.sqrt(s2 / sxx)
    intercept_se = math.sqrt(s2 * (1.0 / n + xm * xm / sxx))
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    r2 = 1.0 - rss / syy if syy > 0 else math.nan
    if slope_se > 0:
        p = float(2.0 * stats.t.sf(abs(slope / slope_se), n - 2))
    else:
        p = 0.0 if slope != 0 else 1.0
    return _OLS(intercept, slope, intercept_se, slope_se, r, r2, p)


_LOG_MAX = math.log(np.finfo(float).max)  # exp() of more overflows


def fit_smoothness(
    grad_norm: Sequence[float] | np.ndarray,
    estimate: Sequence[float] | np.ndarray,
    kind: FitKind = "affine",
) -> AffineFit | PowerFit:
    """Fit ``L`` (``estimate``) against ``g = ‖∇f‖`` (``grad_norm``).

    ``kind="affine"``: ``L ≈ L0 + L1·g`` (:class:`AffineFit`); ``kind="power"``:
    ``L ≈ a·g^b`` (:class:`PowerFit`). Non-finite pairs are dropped (and, for the power
    fit, pairs with ``g <= 0`` or ``L <= 0``). Raises ``ValueError`` with fewer than 3
    usable points (saying how many), when all ``g`` are equal, or when the power fit's
    ``a = exp(log a)`` overflows or underflows a float, or ``a·g^b`` is not a finite positive
    number at the data (``g`` spanning a tiny range, as in a short run).
    """
    if kind not in ("affine", "power"):
        raise UsageError(f"kind={kind!r}; expected 'affine' or 'power'")
    x, y, total = _clean(grad_norm, estimate, positive=kind == "power")
    if x.size < 3:
        extra = "finite, positive" if kind == "power" else "finite"
        raise UsageError(
            f"need at least 3 {extra} (grad_norm, estimate) points to fit, got {x.size} "
            f"(of {total})"
        )
    if kind == "affine":
        res = _ols(x, y)
        return AffineFit(
            L0=res.intercept,
            L1=res.slope,
            L0_se=res.intercept_se,
            L1_se=res.slope_se,
            r2=res.r2,
            r=res.r,
            p_value=res.p_value,
            n=int(x.size),
        )
    res = _ols(np.log(x), np.log(y))
    a = math.exp(res.intercept) if res.intercept <= _LOG_MAX else math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        fitted = a * x**res.slope
    if not (0 < a < math.inf and np.isfinite(fitted).all() and (fitted > 0).all()):
        # gradient norms that barely move (a short run) put |log a| and |b| in the thousands
        raise UsageError(
            f"cannot fit a power law: a = exp({res.intercept:.4g}) and b = {res.slope:.4g} "
            "give no finite positive L at the data (the gradient norms span only a factor "
            f"{x.max() / x.min():.6g})"
        )
    return PowerFit(
        a=a,
        b=res.slope,
        log_a_se=res.intercept_se,
        b_se=res.slope_se,
        r2=res.r2,
        r=res.r,
        p_value=res.p_value,
        n=int(x.size),
    )


def fit_blocks(
    smoothness: pd.DataFrame,
    kind: FitKind = "affine",
    norm: str | None = None,
    blocks: Sequence[str] | None = None,
) -> dict[str, AffineFit | PowerFit | ValueError]:
    """:func:`fit_smoothness` of ``estimate`` on ``grad_norm`` for each block.

    Returns block -> fit, in order of first appearance; a block that cannot be fitted
    (too few points, constant gradient norm) maps to the ``ValueError`` explaining why,
    so one bad block does not hide the others. ``norm`` selects the Hessian norm as in
    :func:`smoothlab.analysis.summary.select_norm`. Raises ``ValueError`` when a requested block is
    absent (naming the blocks found) or the frame lacks the needed columns.
    """
    from smoothlab.analysis.summary import select_norm

    missing = [c for c in ("block", "estimate", "grad_norm") if c not in smoothness.columns]
    if missing:
        raise UsageError(
            f"smoothness frame: missing column(s) {missing}; found {list(smoothness.columns)}"
        )
    df = select_norm(smoothness, norm)
    found = [str(b) for b in pd.unique(df["block"].dropna())]
    if blocks is None:
        blocks = found
    else:
        absent = [b for b in blocks if b not in found]
        if absent:
            raise UsageError(f"block(s) {absent} not in the smoothness frame; found {found}")
    out: dict[str, AffineFit | PowerFit | ValueError] = {}
    for b in blocks:
        g = df[df["block"] == b]
        try:
            out[b] = fit_smoothness(g["grad_norm"], g["estimate"], kind=kind)
        except ValueError as exc:
            out[b] = ValueError(f"block {b!r}: {exc}")
    return out


def fit_table(fits: dict[str, AffineFit | PowerFit | ValueError]) -> pd.DataFrame:
    """The fits of :func:`fit_blocks` as a frame, one row per block (``note`` holds the
    reason a block could not be fitted)."""
    rows = []
    for block, fit in fits.items():
        if isinstance(fit, ValueError):
            rows.append({"block": block, "note": str(fit)})
        else:
            rows.append({"block": block, **asdict(fit), "note": ""})
    return pd.DataFrame(rows)
