r"""``spectral``: ‖H‖₂ = max_i |λ_i| (the local smoothness L) by the Lanczos method.

Formula. From a random unit start q₁, k steps of the three-term recurrence
β_j q_{j+1} = H q_j − α_j q_j − β_{j−1} q_{j−1}, α_j = q_jᵀ H q_j, build the tridiagonal
T_k = tridiag(β, α, β). Its eigenpairs (θ_i, s_i) are the Ritz pairs; the estimate is the
Ritz value of largest modulus, |θ|, with Ritz vector u = Q_k s.

What the residual bounds. r = ‖H u − θ u‖ = β_k |s_{k,i}| (exact in exact arithmetic).
For symmetric H and unit u, *some* eigenvalue λ_j satisfies |θ − λ_j| ≤ r — not
necessarily the largest in modulus: a run that has not yet found the top of the spectrum can
have a small residual around an interior eigenvalue. ``residual`` is therefore an accuracy
statement about θ, and ``converged`` (r ≤ tol·|θ|) says the Ritz pair settled, not that λ_max
was found.

Bias. Ritz values lie inside [λ_min, λ_max] (Cauchy interlacing), so the estimate is a
*lower bound* of ‖H‖₂ that increases with k; the bias is the gap ‖H‖₂ − |θ| ≥ 0, which
shrinks geometrically in k at a rate set by the relative gap of the extreme eigenvalue
(Kaniel–Paige–Saad bounds). Without reorthogonalisation, loss of orthogonality in floating
point produces duplicate ("ghost") Ritz values but does not push them outside the spectrum
by more than O(ε‖H‖) (Paige 1976). With the ``fd``/``fd-central`` oracles the operator is
only approximately symmetric (Hᵀ ≠ H by O(h) or O(h²) truncation and by rounding), so the
interlacing bound and the residual bound hold only up to that asymmetry.

Variance. Deterministic given the start vector: ``stderr`` is nan, ``residual`` carries
the accuracy.

Memory. Full reorthogonalisation (against every stored basis vector, twice) while the
Krylov basis fits (d·k ≤ 5·10⁷ numbers); beyond that — any 22M-parameter block — the plain
three-term recurrence with two vectors in memory.

Citation. C. Lanczos (1950), J. Res. Nat. Bur. Standards 45; C. C. Paige (1976), IMA J.
Appl. Math. 18; Y. Saad, *Numerical Methods for Large Eigenvalue Problems* (2011), ch. 6.

>>> import torch
>>> H = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5], dtype=torch.float64))
>>> est = lanczos(lambda v: H @ v, torch.Generator().manual_seed(0), dim=4, max_iter=4)
>>> round(est.value, 8), est.converged, est.num_hvp <= 4
(5.0, True, True)
>>> est.value <= float(torch.linalg.eigvalsh(H).abs().max()) + 1e-12  # a lower bound
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..estimate import Estimate
from .operator import Callback, as_operator, check_estimator_options, dot64, random_vector

REORTH_LIMIT = 50_000_000


def uses_reorth(dim: int, max_iter: int, reorth: bool | None = None) -> bool:
    """Whether a run of ``max_iter`` steps on a ``dim``-vector stores and reorthogonalises."""
    return (dim * min(max_iter, dim) <= REORTH_LIMIT) if reorth is None else bool(reorth)


def _top_ritz(alphas: list[float], betas: list[float], beta: float) -> tuple[float, float]:
    """(θ of largest modulus, its residual β_k |s_k|) from the tridiagonal T_k."""
    from scipy.linalg import eigh_tridiagonal

    if len(alphas) == 1:
        return alphas[0], abs(beta)
    evals, evecs = eigh_tridiagonal(np.array(alphas), np.array(betas))
    i = int(np.argmax(np.abs(evals)))
    return float(evals[i]), abs(beta * float(evecs[-1, i]))


def lanczos(
    op: Any,
    gen: torch.Generator,
    *,
    max_iter: int = 20,
    tol: float = 1e-3,
    reorth: bool | None = None,
    callback: Callback | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Estimate:
    """|θ_max| of H by Lanczos (see the module docstring). ``reorth``: None = automatic.

    ``op``: an operator, a square tensor, or a callable ``v ↦ H v`` with ``dim=`` (and
    ``dtype=``/``device=`` of the vectors it takes: float64 on CPU by default)."""
    check_estimator_options(max_iter, tol=tol, count="max_iter", gen=gen)
    op = as_operator(op, dim=dim, dtype=dtype, device=device)
    n, dtype, device = op.dim, op.dtype, op.device
    k_max = min(max_iter, n)
    store = uses_reorth(n, k_max, reorth)
    v = random_vector("unit", n, gen, dtype, device)
    basis, v_prev = ([v] if store else []), torch.zeros_like(v)
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    beta, theta, residual, converged = 0.0, 0.0, math.inf, False
    reuse = bool(getattr(op, "matvec_out", False)) and not store  # H v into a freed buffer
    spare: torch.Tensor | None = None
    for j in range(k_max):
        w = op.matvec(v, out=spare) if reuse else op.matvec(v)
        alpha = dot64(w, v)
        w = w.sub_(v, alpha=alpha) if w is not v else w - alpha * v  # a fresh result: in place
        if beta:
            w.sub_(v_prev, alpha=beta)
        if store:
            q = torch.stack(basis)
            for _ in range(2):
                w = w - q.T @ (q @ w)
        beta = math.sqrt(dot64(w, w))
        alphas.append(alpha)
        theta, residual = _top_ritz(alphas, betas, beta)
        history.append(abs(theta))
        if callback:
            callback(j + 1, k_max)
        # breakdown (an invariant subspace) relative to H's own scale, never an absolute one:
        # a floor of 1 stopped an H of norm 1e-13 after one HVP at 1/44 of its norm
        scale = max(abs(theta), max(map(abs, alphas)), max(betas, default=0.0))
        if residual <= tol * max(abs(theta), 1e-30) or beta <= 1e-12 * scale:
            converged = True
            break
        betas.append(beta)
        spare = v_prev  # no longer needed: the next H v goes there
        v_prev, v = v, w.div_(beta)
        if store:
            basis.append(v)
    return Estimate(
        value=abs(theta),
        stderr=math.nan,
        num_hvp=len(history),
        norm="spectral",
        hvp=getattr(op, "kind", "operator"),
        dim=n,
        samples=tuple(history),
        residual=residual,
        converged=converged or len(history) == n,
    )
