r"""Norm estimators of a block Hessian H = ∇²_bb f from an :class:`~smoothlab.hvp.Oracle`.

``NORMS``:

* ``spectral``  ‖H‖₂ = max_i |λ_i| — the local smoothness L. Lanczos on H with the extreme
  Ritz value θ; the residual ‖H u − θ u‖ = β_k |s_k| bounds |θ − λ| and is the stopping test
  (relative tolerance ``tol``). Full reorthogonalisation while the Krylov basis fits in
  memory (d_b · k ≤ 5·10⁷ numbers), otherwise the plain three-term recurrence.
* ``frobenius`` ‖H‖_F. Hutchinson: for E[v vᵀ] = I (Gaussian or Rademacher v),
  E‖H v‖² = tr(H²) = ‖H‖_F², so the sample mean m of ‖H v_i‖² is unbiased for ‖H‖_F²;
  value = √m, stderr = se(m) / (2√m). With ``hvp="zo"`` (function values only) the
  quadratic forms c = vᵀHv, v ~ N(0, I), have E c = tr H and Var c = 2‖H‖_F², so the
  unbiased sample variance s² gives ‖H‖_F² ≈ s²/2.
* ``rms``       the paper's Appendix D.4 estimator over random *unit* vectors u:
  √(mean ‖H u_i‖²), and E‖H u‖² = ‖H‖_F² / d_b, so it estimates ‖H‖_F / √d_b — the root
  mean square eigenvalue, not the Frobenius norm the paper names it.
* ``trace``     tr H = E vᵀHv (Hutchinson; Gaussian by default, Rademacher has the lower variance).

Stochastic estimators stop early once stderr / |value| ≤ ``target_rel_stderr`` (after at
least ``min_vectors`` samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .estimate import Estimate
from .hvp import Oracle

NORMS = ("spectral", "frobenius", "rms", "trace")
DISTRIBUTIONS = ("gaussian", "rademacher")
_REORTH_LIMIT = 50_000_000

Callback = Callable[[int, int], None]


def random_vector(kind: str, dim: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random vector: ``gaussian`` N(0, I), ``rademacher`` ±1, ``unit`` uniform on the sphere."""
    if kind == "rademacher":
        return torch.randint(0, 2, (dim,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)
    v = torch.randn(dim, generator=gen, device=device, dtype=dtype)
    if kind == "unit":
        v /= v.norm()
    return v


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan)


def spectral(
    oracle: Oracle,
    gen: torch.Generator,
    *,
    max_iter: int = 20,
    tol: float = 1e-3,
    callback: Callback | None = None,
) -> Estimate:
    """Largest |eigenvalue| of H_bb by Lanczos (see module docstring)."""
    from scipy.linalg import eigh_tridiagonal

    if oracle.kind == "zo":
        raise ValueError(
            "norm='spectral' needs Hessian-vector products; hvp='zo' gives only quadratic "
            "forms. Use hvp='fd', 'fd-central' or 'exact', or norm='trace'/'frobenius' with 'zo'"
        )
    dim, dtype, device = oracle.dim, oracle.dtype, oracle.device
    k_max = min(max_iter, dim)
    store = dim * k_max <= _REORTH_LIMIT
    v = random_vector("unit", dim, gen, dtype, device)
    basis = [v] if store else []
    v_prev = torch.zeros_like(v)
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    beta = 0.0
    theta, residual, converged = 0.0, math.inf, False
    for j in range(k_max):
        w = oracle.hvp(v)
        alpha = float(torch.dot(w, v))
        w.sub_(v, alpha=alpha)  # w is a fresh HVP result: update it in place
        if beta:
            w.sub_(v_prev, alpha=beta)
        if store:
            for _ in range(2):
                q = torch.stack(basis)
                w = w - q.T @ (q @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        evals, evecs = eigh_tridiagonal(np.array(alphas), np.array(betas)) if j > 0 else (
            np.array(alphas), np.ones((1, 1)))
        idx = int(np.argmax(np.abs(evals)))
        theta = float(evals[idx])
        residual = abs(beta * float(evecs[-1, idx]))
        history.append(abs(theta))
        if callback:
            callback(j + 1, k_max)
        if residual <= tol * max(abs(theta), 1e-30) or beta <= 1e-12 * max(abs(theta), 1.0):
            converged = True
            break
        betas.append(beta)
        v_prev, v = v, w.div_(beta)
        if store:
            basis.append(v)
    if j + 1 == dim:
        converged = True
    return Estimate(
        value=abs(theta), stderr=math.nan, num_hvp=oracle.num_hvp, norm="spectral",
        hvp=oracle.kind, dim=dim, samples=tuple(history), residual=residual, converged=converged,
    )


def _sample(
    draw: Callable[[], float],
    finish: Callable[[np.ndarray], tuple[float, float]],
    *,
    num_vectors: int,
    target_rel_stderr: float | None,
    min_vectors: int,
    callback: Callback | None,
) -> tuple[np.ndarray, float, float, bool]:
    xs: list[float] = []
    value, se = math.nan, math.nan
    reached = target_rel_stderr is None
    for i in range(num_vectors):
        xs.append(draw())
        if callback:
            callback(i + 1, num_vectors)
        if target_rel_stderr is not None and len(xs) >= min_vectors:
            value, se = finish(np.array(xs))
            if math.isfinite(se) and se <= target_rel_stderr * abs(value):
                reached = True
                break
    arr = np.array(xs)
    value, se = finish(arr)
    return arr, value, se, reached


def stochastic(
    norm: str,
    oracle: Oracle,
    gen: torch.Generator,
    *,
    num_vectors: int = 20,
    distribution: str = "gaussian",
    target_rel_stderr: float | None = None,
    min_vectors: int = 5,
    callback: Callback | None = None,
) -> Estimate:
    """``frobenius``, ``rms`` or ``trace`` by Monte Carlo over random vectors."""
    if norm not in ("frobenius", "rms", "trace"):
        raise ValueError(f"unknown stochastic norm {norm!r}; accepted: frobenius, rms, trace")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; accepted: {', '.join(DISTRIBUTIONS)}")
    dim, dtype, device = oracle.dim, oracle.dtype, oracle.device
    zo = oracle.kind == "zo"
    if zo and norm in ("frobenius", "rms") and distribution != "gaussian":
        raise ValueError(
            f"hvp='zo' estimates the Frobenius norm from Var(vᵀHv) = 2‖H‖_F², which holds for "
            f"Gaussian vectors only; got distribution={distribution!r} (accepted: 'gaussian')"
        )
    if zo and norm != "trace" and num_vectors < 3:
        raise ValueError(f"hvp='zo' with norm={norm!r} needs num_vectors >= 3, got {num_vectors}")

    if zo:
        kind = "rademacher" if norm == "trace" and distribution == "rademacher" else "gaussian"
    elif norm == "rms":
        kind = "unit"
    else:
        kind = distribution

    def draw() -> float:
        v = random_vector(kind, dim, gen, dtype, device)
        if zo or norm == "trace":
            return oracle.quad(v)
        hv = oracle.hvp(v)
        return float(hv.pow(2).sum(dtype=torch.float64))

    scale = math.sqrt(dim) if (zo and norm == "rms") else 1.0

    def finish(x: np.ndarray) -> tuple[float, float]:
        if norm == "trace":
            return _mean_se(x)
        if zo:  # ‖H‖_F² ≈ s²/2; se(s²) ≈ sqrt((m4 − s⁴ (n−3)/(n−1)) / n)
            n = len(x)
            if n < 3:
                return math.nan, math.nan
            s2 = float(x.var(ddof=1))
            m4 = float(((x - x.mean()) ** 4).mean())
            var_s2 = max((m4 - s2 * s2 * (n - 3) / (n - 1)) / n, 0.0)
            sq, sq_se = s2 / 2.0, math.sqrt(var_s2) / 2.0
        else:
            sq, sq_se = _mean_se(x)
        value = math.sqrt(max(sq, 0.0))
        se = sq_se / (2 * value) if value > 0 else math.nan
        return value / scale, se / scale

    samples, value, se, reached = _sample(
        draw, finish, num_vectors=num_vectors, target_rel_stderr=target_rel_stderr,
        min_vectors=min_vectors, callback=callback,
    )
    return Estimate(
        value=value, stderr=se, num_hvp=oracle.num_hvp, norm=norm, hvp=oracle.kind, dim=dim,
        samples=tuple(float(s) for s in samples), converged=reached,
    )
