"""The result type every estimator returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Estimate:
    """An estimate of one block's Hessian norm.

    ``value``: the estimate. ``stderr``: its standard error (``nan`` where it has no meaning,
    e.g. a deterministic Lanczos run; there ``residual`` carries the accuracy). A standard
    error, not an interval: from n < 10 vectors, ± t_{n−1}·stderr is needed (t = 12.7 at
    n = 2, 2.78 at 5, 2.26 at 10 for 95%; see :func:`smoothlab.estimators.operator.mean_se`).
    ``num_hvp``: Hessian-vector products (or, for ``hvp="zo"``, second differences) spent.
    ``samples``: the per-vector samples (Monte-Carlo norms) or the per-iteration Ritz values
    (spectral). ``residual``: ‖H u − θ u‖ of the top Ritz pair (spectral only).
    ``converged``: whether the tolerance (or the target relative stderr) was met.
    ``norm``/``hvp``/``dim``: what was estimated, with which oracle, over how many parameters.
    ``grad_norm``: ‖∇_b f‖₂ at the probed point when the oracle computed it anyway (``fd``,
    ``exact``); ``nan`` otherwise.
    ``rounding_noise`` (``zo`` only): the rounding std of one second-difference sample, in the
    units of vᵀHv. ``rounding_dominated``: rounding noise is more than half of the sample
    variance, or the rounding error shared by all samples exceeds the Monte-Carlo stderr
    (see :mod:`smoothlab.estimators.zo`).
    """

    value: float
    stderr: float = math.nan
    num_hvp: int = 0
    norm: str = ""
    hvp: str = ""
    dim: int = 0
    samples: tuple[float, ...] = field(default=(), repr=False)
    residual: float = math.nan
    converged: bool = True
    seconds: float = 0.0
    grad_norm: float = math.nan
    rounding_noise: float = math.nan
    rounding_dominated: bool = False

    @property
    def rel_stderr(self) -> float:
        """stderr / |value| (``nan`` when undefined)."""
        if not math.isfinite(self.stderr) or self.value == 0:
            return math.nan
        return self.stderr / abs(self.value)

    def as_dict(self) -> dict:
        """A JSON-friendly dict (samples included as a list)."""
        return {
            "value": self.value,
            "stderr": self.stderr,
            "num_hvp": self.num_hvp,
            "norm": self.norm,
            "hvp": self.hvp,
            "dim": self.dim,
            "residual": self.residual,
            "converged": self.converged,
            "seconds": self.seconds,
            "grad_norm": self.grad_norm,
            "rounding_noise": self.rounding_noise,
            "rounding_dominated": self.rounding_dominated,
            "samples": list(self.samples),
        }
