r"""``rms``: ‖H‖_F / √d, the paper's Appendix D.4 estimator (root-mean-square eigenvalue).

Formula. Over random *unit* vectors u (uniform on the sphere), E‖H u‖² = ‖H‖_F² / d; the
estimate is √m with m the sample mean of ‖H u_i‖², ``stderr`` = se(m)/(2√m). The paper calls
this the Frobenius norm; it is ‖H‖_F/√d = √(mean_i λ_i²), smaller by √d.

Bias. m is unbiased for ‖H‖_F²/d; √m is biased low by O(1/n) (Jensen), as for ``frobenius``.

Variance. For u = g/‖g‖ with Gaussian g: Var‖Hu‖² = 2(d‖H²‖_F² − ‖H‖_F⁴)/(d²(d+2)),
so rel. stderr of √m ≤ 1/√(2n).

Standard error. ``stderr`` is a standard error, not an interval; at n < 10 vectors use
± t_{n−1}·stderr (95%: t = 12.7, 4.30, 3.18, 2.78 at n = 2, 3, 4, 5; 2.26 at n = 10),
see :func:`~smoothlab.estimators.operator.mean_se`.

Citation. The paper's Appendix D.4; Hutchinson (1990) for the underlying identity.

>>> import torch
>>> H = torch.diag(torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=torch.float64))
>>> est = rms(lambda v: H @ v, torch.Generator().manual_seed(0), dim=4, num_vectors=4000)
>>> abs(est.value - 5.0 / 2) <= 4 * est.stderr  # ‖H‖_F/√d = 5/√4
True
"""

from __future__ import annotations

from typing import Any

import torch

from ..estimate import Estimate
from .frobenius import sample_buffers, squared_norms
from .operator import (
    MIN_VECTORS,
    Callback,
    as_operator,
    check_estimator_options,
    mean_sqrt,
    monte_carlo,
)


def rms(
    op: Any,
    gen: torch.Generator,
    *,
    num_vectors: int = 20,
    target_rel_stderr: float | None = None,
    min_vectors: int = MIN_VECTORS,
    callback: Callback | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Estimate:
    """‖H‖_F/√d = √(E‖Hu‖²) over unit u (see the module docstring)."""
    check_estimator_options(
        num_vectors, target_rel_stderr=target_rel_stderr, min_vectors=min_vectors, gen=gen
    )
    op = as_operator(op, dim=dim, dtype=dtype, device=device)
    bufs = sample_buffers(op)
    return monte_carlo(
        op,
        "rms",
        lambda: squared_norms(op, "unit", gen, bufs),
        mean_sqrt,
        num_vectors=num_vectors,
        target_rel_stderr=target_rel_stderr,
        min_vectors=min_vectors,
        callback=callback,
    )
