r"""``trace``: tr H by Hutchinson's estimator.

Formula. For random v with E[v vᵀ] = I, E[vᵀ H v] = tr H; the estimate is the sample mean
of c_i = v_iᵀ H v_i over n vectors, and ``stderr`` = s/√n (s the sample standard deviation).

Bias. None (for exact H v; the ``fd`` oracles add their O(h)/O(h²) truncation).

Variance. Var(vᵀHv) = 2‖H‖_F² for Gaussian v and 2(‖H‖_F² − Σ_i H_ii²) for Rademacher v
(±1 entries), so Rademacher is never worse; the estimate's variance is that over n.

Standard error. ``stderr`` is a standard error, not an interval; at n < 10 vectors use
± t_{n−1}·stderr (95%: t = 12.7, 4.30, 3.18, 2.78 at n = 2, 3, 4, 5; 2.26 at n = 10),
see :func:`~smoothlab.estimators.operator.mean_se`.

Citation. M. F. Hutchinson (1990), Commun. Stat. Simul. Comput. 19(2); H. Avron and
S. Toledo (2011), J. ACM 58(2).

>>> import torch
>>> H = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5], dtype=torch.float64))
>>> est = hutchinson_trace(lambda v: H @ v, torch.Generator().manual_seed(0), dim=4,
...                        num_vectors=50, distribution="rademacher")
>>> est.value  # diagonal H: every Rademacher sample is exactly tr H (zero variance)
-0.5
"""

from __future__ import annotations

from typing import Any

import torch

from ..estimate import Estimate
from .operator import (
    MIN_VECTORS,
    Callback,
    as_operator,
    check_distribution,
    check_estimator_options,
    mean_se,
    monte_carlo,
    quad_form,
    random_vector,
    vector_buffer,
)


def hutchinson_trace(
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
    """tr H = E vᵀHv (see the module docstring). Uses ``op.quad`` when the operator has one."""
    check_estimator_options(
        num_vectors, target_rel_stderr=target_rel_stderr, min_vectors=min_vectors, gen=gen
    )
    check_distribution(distribution)
    op = as_operator(op, dim=dim, dtype=dtype, device=device)
    buf = vector_buffer(op.dim, op.dtype, op.device)  # v is consumed by each sample
    return monte_carlo(
        op,
        "trace",
        lambda: quad_form(op, random_vector(distribution, op.dim, gen, op.dtype, op.device, buf)),
        mean_se,
        num_vectors=num_vectors,
        target_rel_stderr=target_rel_stderr,
        min_vectors=min_vectors,
        callback=callback,
    )
