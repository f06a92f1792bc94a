"""Shared ground truth for the probe tests: dense float64 Hessians and planted quadratics.

* :func:`dense_hessian` — the block Hessian of a scalar loss by plain double backward (all
  unit vectors at once), built independently of smoothlab.
* :func:`planted` / :func:`orthogonal` — symmetric matrices with a chosen spectrum.
* :class:`Quadratic` — f = ½xᵀAx + ½yᵀBy + xᵀCy with planted A, B and a large coupling C
  (the answer for block x is a norm of A, never of the full Hessian).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def dense_hessian(
    loss: torch.Tensor | Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    batched: bool = True,
) -> torch.Tensor:
    """Dense Hessian of ``loss`` (a tensor with a graph, or a zero-argument callable) w.r.t.
    ``params``, symmetrised, float64, detached. ``batched=False`` takes one backward per row
    (for models whose ops have no vmap rule); attention runs on SDPA's math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = list(params)
    with sdpa_kernel([SDPBackend.MATH]):
        value = loss() if callable(loss) else loss
        grads = torch.autograd.grad(value, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        if batched:
            cols = torch.autograd.grad(
                flat, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True
            )
        else:
            rows = [
                torch.autograd.grad(
                    flat, params, grad_outputs=e, retain_graph=True, allow_unused=True
                )
                for e in eye
            ]
            cols = [
                None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                for i in range(len(params))
            ]
    H = (
        torch.cat(
            [
                torch.zeros(flat.numel(), p.numel(), dtype=flat.dtype)
                if c is None
                else c.reshape(flat.numel(), -1)
                for c, p in zip(cols, params)
            ],
            1,
        )
        .detach()
        .double()
    )
    return 0.5 * (H + H.T)


def norms_of(H: torch.Tensor) -> dict[str, float]:
    """spectral, frobenius, rms and trace of a symmetric matrix."""
    eig = torch.linalg.eigvalsh(H.double())
    fro = float(eig.norm())
    return {
        "spectral": float(eig.abs().max()),
        "frobenius": fro,
        "rms": fro / math.sqrt(len(eig)),
        "trace": float(eig.sum()),
    }


def haar(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal n×n matrix (float64)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    """A dense random orthogonal matrix (float64); a Kronecker product of two for large d."""
    for k in (40, 25, 20, 10):
        if d > 400 and d % k == 0:
            return torch.kron(haar(k, gen), haar(d // k, gen))
    return haar(d, gen)


def planted(eigs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q (float64)."""
    q = orthogonal(len(eigs), gen)
    return (q * eigs.double()) @ q.T


class Quadratic:
    """f = ½xᵀAx + ½yᵀBy + xᵀCy with planted A = Q_x diag(e_x) Q_xᵀ, B = Q_y diag(e_y) Q_yᵀ.

    ‖A‖₂ = top_x, ‖B‖₂ = top_y (B's extreme eigenvalue is negative), the rest uniform in
    ±0.9·top; C is a dense coupling with entries of size ``coupling/√d_y``.
    """

    def __init__(
        self, dx, dy, *, top_x=100.0, top_y=1.0, coupling=30.0, dtype=torch.float32, seed=0
    ):
        g = torch.Generator().manual_seed(seed)
        self.ex = torch.cat(
            [
                torch.tensor([top_x], dtype=torch.float64),
                torch.empty(dx - 1, dtype=torch.float64).uniform_(
                    -0.9 * top_x, 0.9 * top_x, generator=g
                ),
            ]
        )
        self.ey = torch.cat(
            [
                torch.tensor([-top_y], dtype=torch.float64),
                torch.empty(dy - 1, dtype=torch.float64).uniform_(
                    -0.9 * top_y, 0.9 * top_y, generator=g
                ),
            ]
        )
        self.Qx, self.Qy = orthogonal(dx, g), orthogonal(dy, g)
        self.C = coupling * torch.randn(dx, dy, generator=g, dtype=torch.float64) / math.sqrt(dy)
        self.x = nn.Parameter(torch.randn(dx, generator=g, dtype=torch.float64).to(dtype))
        self.y = nn.Parameter(torch.randn(dy, generator=g, dtype=torch.float64).to(dtype))
        self._mats = [m.to(dtype) for m in (self.Qx, self.ex, self.Qy, self.ey, self.C)]

    def __call__(self) -> torch.Tensor:
        Qx, ex, Qy, ey, C = self._mats
        x, y = self.x, self.y
        return 0.5 * (ex * (x @ Qx) ** 2).sum() + 0.5 * (ey * (y @ Qy) ** 2).sum() + x @ (C @ y)

    def shift_x_spectrum(self, c: float) -> None:
        """A → A + c I."""
        self.ex += c
        self._mats[1] = self.ex.to(self._mats[1].dtype)

    @property
    def A(self) -> torch.Tensor:
        return (self.Qx * self.ex) @ self.Qx.T

    @property
    def B(self) -> torch.Tensor:
        return (self.Qy * self.ey) @ self.Qy.T

    @property
    def blocks(self):
        return {"x": [self.x], "y": [self.y]}

    def truth(self, norm: str) -> dict[str, float]:
        out = {}
        for name, e in (("x", self.ex), ("y", self.ey)):
            fro = float(e.pow(2).sum().sqrt())
            out[name] = {
                "spectral": float(e.abs().max()),
                "frobenius": fro,
                "rms": fro / math.sqrt(len(e)),
                "trace": float(e.sum()),
            }[norm]
        return out

    def full_spectral_x_lower_bound(self) -> float:
        """‖[[A, C], [Cᵀ, B]]‖₂ ≥ ‖H (u, 0)‖ for A's top eigenvector u: what a probe that
        forgot the block restriction (perturbing y too, or reading y's gradient) would drift to."""
        u = self.Qx[:, 0]
        return math.hypot(float(self.ex[0]), float((self.C.T @ u).norm()))


def coupled_quadratic(dx=40, dy=12, dtype=torch.float64, seed=0, coupling=30.0):
    """A :class:`Quadratic` with eigenvalues uniform in ±10 (x) and ±1 (y) as
    (x, y, f, A, B, C); A, B, C float64."""
    q = Quadratic(dx, dy, top_x=10.0, top_y=1.0, coupling=coupling, dtype=dtype, seed=seed)
    return q.x, q.y, q, q.A, q.B, q.C
