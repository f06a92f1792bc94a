r"""Learning-rate advisor: step sizes from block smoothness (the paper's Section 3, insight 1).

For the PEFT block y (exact gradients), the descent lemma gives the classic η_y = c_y / L_y.
For the base block x with a Gaussian SPSA estimate averaged over q perturbations,
E‖ĝ_x‖² = ((d_x + 1)/q + 1)‖∇_x f‖² (two-sided, μ → 0), and minimising the descent-lemma bound
−η‖∇f‖² + (L_x η²/2) E‖ĝ‖² gives

    η_x = c_x · q / (L_x (d_x + 1 + q))  ≈  c_x / (L_x d_x)      (d_x ≫ q).

A one-sided estimate has the same second moment to first order (plus an O(μ L_x d_x) bias),
so it gets the same proposal. With ``x_gradient="exact"`` (first-order x) η_x = c_x / L_x; on
the paper's Example 2.3, f = a x² + b y², that is exactly 1/(2a) and 1/(2b) for c = 1.

Uncertainty is carried through to first order: se(η)/η = se(L)/L.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Advice:
    """A learning-rate proposal with its inputs."""

    eta_x: float
    eta_y: float
    eta_x_stderr: float
    eta_y_stderr: float
    L_x: float
    L_y: float
    L_x_stderr: float
    L_y_stderr: float
    d_x: int
    q: int
    one_sided: bool
    x_gradient: str
    c_x: float
    c_y: float
    source: str

    @property
    def ratio(self) -> float:
        """η_y / η_x."""
        return self.eta_y / self.eta_x

    @property
    def formula(self) -> str:
        if self.x_gradient == "exact":
            fx = "eta_x = c_x / L_x"
        else:
            fx = "eta_x = c_x * q / (L_x * (d_x + 1 + q))  (~ c_x / (L_x d_x))"
        return f"{fx};  eta_y = c_y / L_y"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(ratio=self.ratio, formula=self.formula)
        return d

    def describe(self) -> str:
        """A few lines for a terminal: the formula, the inputs and the result."""
        pm = lambda v, s: f"{v:.4g}" + (f" ± {s:.2g}" if math.isfinite(s) else "")  # noqa: E731
        return "\n".join([
            f"formula : {self.formula}",
            f"inputs  : L_x = {pm(self.L_x, self.L_x_stderr)}, L_y = {pm(self.L_y, self.L_y_stderr)}, "
            f"d_x = {self.d_x:,}, q = {self.q}, {'one' if self.one_sided else 'two'}-sided, "
            f"c_x = {self.c_x:g}, c_y = {self.c_y:g}  (source: {self.source})",
            f"eta_x   : {pm(self.eta_x, self.eta_x_stderr)}",
            f"eta_y   : {pm(self.eta_y, self.eta_y_stderr)}",
            f"ratio   : eta_y / eta_x = {self.ratio:.4g}",
        ])


def _positive(name: str, v: float) -> float:
    if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def advise(
    L_x: float,
    L_y: float,
    d_x: int,
    *,
    q: int = 1,
    one_sided: bool = False,
    x_gradient: str = "zo",
    c_x: float = 1.0,
    c_y: float = 1.0,
    L_x_stderr: float = math.nan,
    L_y_stderr: float = math.nan,
    source: str = "given",
) -> Advice:
    """Propose (η_x, η_y) from the block smoothness constants (see module docstring)."""
    L_x, L_y = _positive("L_x", L_x), _positive("L_y", L_y)
    c_x, c_y = _positive("c_x", c_x), _positive("c_y", c_y)
    if not isinstance(d_x, int | np.integer) or d_x < 1:
        raise ValueError(f"d_x must be a positive integer (parameters in the base block), got {d_x!r}")
    if not isinstance(q, int) or q < 1:
        raise ValueError(f"q must be an integer >= 1, got {q!r}")
    if x_gradient not in ("zo", "exact"):
        raise ValueError(f"x_gradient must be 'zo' or 'exact', got {x_gradient!r}")
    eta_x = c_x / L_x if x_gradient == "exact" else c_x * q / (L_x * (int(d_x) + 1 + q))
    eta_y = c_y / L_y
    return Advice(
        eta_x=eta_x, eta_y=eta_y,
        eta_x_stderr=eta_x * L_x_stderr / L_x, eta_y_stderr=eta_y * L_y_stderr / L_y,
        L_x=L_x, L_y=L_y, L_x_stderr=L_x_stderr, L_y_stderr=L_y_stderr, d_x=int(d_x), q=q,
        one_sided=one_sided, x_gradient=x_gradient, c_x=c_x, c_y=c_y, source=source,
    )


def trajectory_L(
    values: Sequence[float], *, quantile: float = 0.9, fraction: float = 0.5, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A robust L from a recorded trajectory: the ``quantile`` of the estimates over the first
    ``fraction`` of training (not one noisy point), with a bootstrap standard error."""
    if not 0 < quantile <= 1 or not 0 < fraction <= 1:
        raise ValueError(f"quantile and fraction must lie in (0, 1], got {quantile}, {fraction}")
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if x.size == 0:
        raise ValueError("the trajectory has no finite estimates")
    x = x[: max(1, math.ceil(fraction * x.size))]
    value = float(np.quantile(x, quantile))
    if x.size < 3:
        return value, math.nan
    rng = np.random.default_rng(seed)
    boots = np.quantile(rng.choice(x, size=(n_boot, x.size), replace=True), quantile, axis=1)
    return value, float(boots.std(ddof=1))


def advise_from_rows(
    rows: Sequence[Mapping[str, object]],
    d_x: int,
    *,
    x_block: str = "base",
    y_block: str = "peft",
    head_block: str | None = "head",
    quantile: float = 0.9,
    fraction: float = 0.5,
    **kwargs: object,
) -> Advice:
    """Advice from recorded ``smoothness.csv`` rows (dicts with ``step``, ``block``, ``estimate``).

    When the first-order block y was recorded as an adapter block plus a ``head_block``
    (a trained classifier), L_y is taken as the larger of the two, a lower bound of the
    joint block's L."""
    def series(block: str) -> list[float]:
        pts = sorted((float(r["step"]), float(r["estimate"])) for r in rows if r.get("block") == block)  # type: ignore[arg-type]
        if not pts:
            found = sorted({str(r.get("block")) for r in rows})
            raise ValueError(f"no rows for block {block!r} in the trajectory; blocks found: {found}")
        return [v for _, v in pts]

    lx, sx = trajectory_L(series(x_block), quantile=quantile, fraction=fraction)
    ly, sy = trajectory_L(series(y_block), quantile=quantile, fraction=fraction)
    if head_block and any(r.get("block") == head_block for r in rows):
        # y = adapter + trained head: L_y ≥ max of the two diagonal blocks' L (a lower bound)
        lh, sh = trajectory_L(series(head_block), quantile=quantile, fraction=fraction)
        if lh > ly:
            ly, sy = lh, sh
    return advise(lx, ly, d_x, L_x_stderr=sx, L_y_stderr=sy,
                  source=f"trajectory q{quantile:g} of first {fraction:.0%}", **kwargs)  # type: ignore[arg-type]
