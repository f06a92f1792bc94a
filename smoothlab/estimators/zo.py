r"""Estimators from quadratic forms only (the ``zo`` oracle: second differences of f).

The oracle returns c(v) = (f(x + s v) − 2 f̂₀ + f(x − s v)) / s² = vᵀHv + O(s²), with f̂₀ an
estimate of f(x) (see :class:`smoothlab.hvp.Oracle`), at inference memory.

Formulas, for n samples c_i with Gaussian v (``trace`` also accepts Rademacher):

* ``trace``: tr H ≈ mean c_i (Hutchinson), Var c = 2‖H‖_F² (Gaussian) or
  2(‖H‖_F² − Σ H_ii²) (Rademacher).
* ``frobenius``: Var(vᵀHv) = 2‖H‖_F² for Gaussian v, so ‖H‖_F² ≈ s²/2 with s² the unbiased
  sample variance; se(s²) = s²·√(12r/n + 2/(n−1)), exact for r = Σλ⁴/(Σλ²)², which is
  estimated and shrunk towards its bound 1 (:func:`_var_se`).  ``rms`` is that over √d.
  Over 2000 repeats on seven spectra (flat to rank one), |estimate − truth| ≤ stderr in
  60–90% of them at n = 10 and 57–88% at n = 30 (78–99% within two stderr), against 32–52%
  and 47–61% with the plain moment estimate it replaces; the lowest figures are for a
  rank-one H, whose c is χ²₁ and whose ‖H‖_F is skewed beyond what ± one number
  describes. ‖H‖_F, the square root of an unbiased s², runs low at small n: by 3% (flat
  spectrum) to 12% (rank one) at n = 10, 1–5% at n = 30.

Bias. ``trace``: O(s²) truncation (a fourth-derivative term) plus rounding. Rounding in each
f(x ± s v) is fresh noise per sample and shows up in the sample variance; but the rounding
error of f̂₀ is *shared by every sample*, a bias of −2 e₀/s² that no number of vectors
averages away (in float32, e₀ ~ ε|f| with ε = 1.2e-7: a large loss with little curvature is
dominated by it). The oracle therefore estimates f(x) from K jittered reference pairs
(f(x + t w_k) + f(x − t w_k))/2, t‖w‖ = 10⁻²·s‖v‖, whose rounding errors are independent, and
reports their spread; ``stderr`` includes the remaining shared error
(stderr² = s²/n + σ²_shared). ``frobenius``/``rms``: rounding inflates s² by the per-sample
rounding variance σ_c², an upward bias of σ_c²/2 in ‖H‖_F².

``rounding_dominated`` is set when rounding noise is more than half of the sample variance
(σ_c² > s²/2), when the shared error exceeds the Monte-Carlo stderr, or when the typical
numerator f(x+sv) + f(x−sv) − 2f̂₀ spans fewer than 32 ulps of f (then the loss's
quantisation is correlated with the signal and can bias the estimate beyond its stderr): a
larger step ``h`` or a float64 loss is needed for a trustworthy value.

Standard error. ``stderr`` is a standard error, not an interval; at n < 10 vectors use
± t_{n−1}·stderr (95%: t = 12.7, 4.30, 3.18, 2.78 at n = 2, 3, 4, 5; 2.26 at n = 10),
see :func:`~smoothlab.estimators.operator.mean_se`.

Citation. Hutchinson (1990); second differences: Nocedal and Wright, *Numerical
Optimization* (2006) §8.1; MeZO: Malladi et al. (2023), NeurIPS.

>>> import torch
>>> from smoothlab.estimators.operator import LinearOperator
>>> H = torch.diag(torch.tensor([3.0, -4.0, 1.0], dtype=torch.float64))
>>> op = LinearOperator(None, 3, quad=lambda v: float(v @ H @ v), kind="zo")
>>> est = zo_trace(op, torch.Generator().manual_seed(0), num_vectors=20, distribution="rademacher")
>>> round(est.value, 12)  # every Rademacher sample of a diagonal H is tr H
0.0
>>> est = zo_frobenius(op, torch.Generator().manual_seed(0), num_vectors=4000)
>>> abs(est.value - 26 ** 0.5) <= 4 * est.stderr  # ‖H‖_F = √26
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..estimate import Estimate
from .operator import (
    MIN_VECTORS,
    Callback,
    as_operator,
    check_distribution,
    check_estimator_options,
    mean_se,
    monte_carlo,
    random_vector,
    vector_buffer,
)

# Prior weight, in samples, of the worst case r = 1 in the fourth-cumulant ratio (see _var_se).
R_PRIOR = 10


def _var_se(x: np.ndarray) -> tuple[float, float]:
    """Unbiased sample variance s² and its stderr (nan for n < 3).

    For c = vᵀHv with Gaussian v the cumulants are κ₂ = 2Σλ² and κ₄ = 48Σλ⁴ = 12 r κ₂² with
    r = Σλ⁴/(Σλ²)² ∈ (0, 1], so Var s² = κ₂² (12 r/n + 2/(n − 1)). r comes from the sample's
    k-statistics, clipped to [0, 1] and shrunk towards the worst case 1 with the weight of
    ``R_PRIOR`` samples: the sample fourth moment is small at small n, which made the plain
    moment estimate of se(s²) too small (0.6× the observed spread at n = 10).
    """
    n = len(x)
    if n < 3:
        return math.nan, math.nan
    s2 = float(x.var(ddof=1))
    r = 1.0
    if n > 3 and s2 > 0:
        d = x - x.mean()
        m2, m4 = float((d**2).mean()), float((d**4).mean())
        k4 = n * n * ((n + 1) * m4 - 3 * (n - 1) * m2 * m2) / ((n - 1) * (n - 2) * (n - 3))
        r = min(max(k4 / (12 * s2 * s2), 0.0), 1.0)
    r = (n * r + R_PRIOR) / (n + R_PRIOR)
    return s2, s2 * math.sqrt(12 * r / n + 2 / (n - 1))


MIN_ULPS = 32.0


def _rounding(op: Any) -> tuple[float, float, float]:
    """(σ_c per-sample rounding std, σ_shared common error std, median numerator in ulps of f)
    as the operator reports them; (0, 0, inf) for an operator without rounding."""
    fn = getattr(op, "rounding", None)
    return fn() if fn is not None else (0.0, 0.0, math.inf)


def _zo(
    norm: str,
    op: Any,
    gen: torch.Generator,
    *,
    num_vectors: int = 20,
    distribution: str = "gaussian",
    target_rel_stderr: float | None = None,
    min_vectors: int = MIN_VECTORS,
    callback: Callback | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Estimate:
    """The body of :func:`zo_trace`, :func:`zo_frobenius` and :func:`zo_rms` (their keywords)."""
    check_estimator_options(
        num_vectors, target_rel_stderr=target_rel_stderr, min_vectors=min_vectors, gen=gen
    )
    op = as_operator(op, dim=dim, dtype=dtype, device=device)
    check_distribution(
        distribution, ("gaussian", "rademacher") if norm == "trace" else ("gaussian",)
    )
    if norm != "trace" and num_vectors < 3:
        raise UsageError(f"hvp='zo' with norm={norm!r} needs num_vectors >= 3, got {num_vectors}")
    scale = math.sqrt(op.dim) if norm == "rms" else 1.0

    def finish(x: np.ndarray) -> tuple[float, float]:
        if norm == "trace":
            m, se = mean_se(x)
            return m, math.hypot(se, _rounding(op)[1]) if math.isfinite(se) else se
        s2, s2_se = _var_se(x)
        value = math.sqrt(max(s2 / 2.0, 0.0))
        se = s2_se / (4 * value) if value > 0 else (0.0 if s2_se == 0 else math.nan)
        return value / scale, se / scale

    def diagnostics(xs: np.ndarray) -> dict[str, Any]:
        sigma_c, sigma_shared, ulps = _rounding(op)
        var = float(xs.var(ddof=1)) if len(xs) > 1 else math.inf
        mc_se = math.sqrt(var / len(xs)) if len(xs) > 1 else math.inf
        dominated = (
            sigma_c**2 > 0.5 * var or (norm == "trace" and sigma_shared > mc_se) or ulps < MIN_ULPS
        )
        return {"rounding_noise": sigma_c, "rounding_dominated": bool(dominated)}

    buf = vector_buffer(op.dim, op.dtype, op.device)  # v is consumed by each sample
    return monte_carlo(
        op,
        norm,
        lambda: float(op.quad(random_vector(distribution, op.dim, gen, op.dtype, op.device, buf))),
        finish,
        num_vectors=num_vectors,
        target_rel_stderr=target_rel_stderr,
        min_vectors=min_vectors,
        callback=callback,
        extra=diagnostics,
    )


# The three public estimators take :func:`_zo`'s keywords: num_vectors=20,
# distribution="gaussian", target_rel_stderr=None, min_vectors=MIN_VECTORS (10), callback=None,
# and, for a plain callable, dim=None, dtype=None (float64), device=None (CPU).
def zo_trace(op: Any, gen: torch.Generator, **options: Any) -> Estimate:
    """tr H ≈ mean vᵀHv from quadratic forms (see the module docstring)."""
    return _zo("trace", op, gen, **options)


def zo_frobenius(op: Any, gen: torch.Generator, **options: Any) -> Estimate:
    """‖H‖_F ≈ √(s²/2) from Gaussian quadratic forms (see the module docstring)."""
    return _zo("frobenius", op, gen, **options)


def zo_rms(op: Any, gen: torch.Generator, **options: Any) -> Estimate:
    """‖H‖_F/√d ≈ √(s²/(2d)) from Gaussian quadratic forms (see the module docstring)."""
    return _zo("rms", op, gen, **options)
