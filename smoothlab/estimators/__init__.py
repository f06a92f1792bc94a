r"""Norm estimators of a block Hessian H = ∇²_bb f, each acting on a linear operator.

One module per estimator (each states its formula, bias, variance and citation):

* :mod:`.lanczos`   ``spectral``  ‖H‖₂ (a lower bound: Ritz values lie inside the spectrum)
* :mod:`.trace`     ``trace``     tr H (Hutchinson)
* :mod:`.frobenius` ``frobenius`` ‖H‖_F (Hutchinson on H²)
* :mod:`.rms`       ``rms``       ‖H‖_F/√d (the paper's D.4)
* :mod:`.zo`        ``trace``/``frobenius``/``rms`` from quadratic forms vᵀHv only (``zo``)

:data:`ESTIMATORS` is the one registry: ``probe()`` dispatches and validates through it,
and :data:`NORMS` (the CLI's ``--norm`` choices) is derived from it. Adding an estimator is
one :class:`EstimatorEntry` here plus its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from ..estimate import Estimate
from .frobenius import hutchinson_frobenius
from .lanczos import lanczos
from .operator import (
    DISTRIBUTIONS,
    MIN_VECTORS,
    LinearOperator,
    Operator,
    as_operator,
    check_estimator_options,
    has_matvec,
    random_vector,
)
from .rms import rms
from .trace import hutchinson_trace
from .zo import zo_frobenius, zo_rms, zo_trace

ALL_HVPS = ("fd", "fd-central", "exact", "zo")


@dataclass(frozen=True)
class Options:
    """Every estimator option probe() passes; each entry reads the ones it uses."""

    num_vectors: int = 20
    tol: float = 1e-3
    distribution: str = "gaussian"
    target_rel_stderr: float | None = None
    min_vectors: int = MIN_VECTORS
    callback: Callable[[int, int], None] | None = None


def _mc(
    fn: Callable[..., Estimate], with_distribution: bool = True
) -> Callable[[Any, torch.Generator, Options], Estimate]:
    def run(op: Any, gen: torch.Generator, o: Options) -> Estimate:
        extra = {"distribution": o.distribution} if with_distribution else {}
        return fn(
            op,
            gen,
            num_vectors=o.num_vectors,
            target_rel_stderr=o.target_rel_stderr,
            min_vectors=o.min_vectors,
            callback=o.callback,
            **extra,
        )

    return run


@dataclass(frozen=True)
class EstimatorEntry:
    """One norm: how to estimate it from H v (``run``) and from vᵀHv only (``run_zo``)."""

    name: str
    summary: str
    run: Callable[[Any, torch.Generator, Options], Estimate]
    run_zo: Callable[[Any, torch.Generator, Options], Estimate] | None
    zo_distributions: tuple[str, ...] = ("gaussian",)
    zo_min_vectors: int = 1
    distributions: tuple[str, ...] = DISTRIBUTIONS  # with H v; ("gaussian",): not a choice

    @property
    def hvps(self) -> tuple[str, ...]:
        """The HVP oracles this estimator accepts."""
        return ALL_HVPS if self.run_zo is not None else tuple(h for h in ALL_HVPS if h != "zo")


ESTIMATORS: dict[str, EstimatorEntry] = {
    e.name: e
    for e in (
        EstimatorEntry(
            "spectral",
            "‖H‖₂, the local smoothness L (Lanczos; a lower bound)",
            lambda op, gen, o: lanczos(
                op, gen, max_iter=o.num_vectors, tol=o.tol, callback=o.callback
            ),
            None,
            distributions=("gaussian",),  # a random unit start vector
        ),
        EstimatorEntry(
            "frobenius",
            "‖H‖_F (Hutchinson)",
            _mc(hutchinson_frobenius),
            _mc(zo_frobenius),
            zo_min_vectors=3,
        ),
        EstimatorEntry(
            "rms",
            "‖H‖_F/√d, the paper's D.4 (unit vectors)",
            _mc(rms, False),
            _mc(zo_rms),
            zo_min_vectors=3,
            distributions=("gaussian",),  # unit vectors (Gaussian ones normalised)
        ),
        EstimatorEntry(
            "trace",
            "tr H (Hutchinson)",
            _mc(hutchinson_trace),
            _mc(zo_trace),
            zo_distributions=DISTRIBUTIONS,
        ),
    )
}
NORMS: tuple[str, ...] = tuple(ESTIMATORS)


def get_estimator(norm: str) -> EstimatorEntry:
    """The registry entry of ``norm``; UsageError naming the accepted names otherwise."""
    if norm not in ESTIMATORS:
        raise UsageError(f"unknown norm {norm!r}; accepted: {', '.join(NORMS)}")
    return ESTIMATORS[norm]


def validate(
    norm: str, hvp: str, distribution: str = "gaussian", num_vectors: int = 1
) -> EstimatorEntry:
    """Check that ``norm`` works with oracle ``hvp`` and ``distribution``; return its entry."""
    entry = get_estimator(norm)
    if hvp not in entry.hvps:
        raise UsageError(
            f"norm={norm!r} needs Hessian-vector products; hvp={hvp!r} gives only quadratic forms "
            f"vᵀHv (accepted with {norm!r}: {', '.join(entry.hvps)}; with 'zo': "
            f"{', '.join(n for n, e in ESTIMATORS.items() if e.run_zo is not None)})"
        )
    if distribution not in DISTRIBUTIONS:
        raise UsageError(
            f"unknown distribution {distribution!r}; accepted: {', '.join(DISTRIBUTIONS)}"
        )
    if hvp != "zo" and distribution not in entry.distributions:
        raise UsageError(
            f"distribution={distribution!r} does not apply to norm={norm!r}, whose vectors are "
            "not chosen (accepted: 'gaussian', the default); it applies to "
            + ", ".join(n for n, e in ESTIMATORS.items() if len(e.distributions) > 1)
        )
    if hvp == "zo":
        if distribution not in entry.zo_distributions:
            raise UsageError(
                f"hvp='zo' estimates {norm!r} from Var(vᵀHv) = 2‖H‖_F², which holds for Gaussian "
                f"vectors only; got distribution={distribution!r} (accepted: "
                f"{', '.join(repr(d) for d in entry.zo_distributions)})"
            )
        if num_vectors < entry.zo_min_vectors:
            raise UsageError(
                f"hvp='zo' with norm={norm!r} needs num_vectors >= {entry.zo_min_vectors}, got {num_vectors}"
            )
    return entry


def estimate(norm: str, op: Any, gen: torch.Generator, options: Options | None = None) -> Estimate:
    """Estimate ``norm`` of the operator ``op`` through the registry (H v if ``op`` has it,
    else quadratic forms)."""
    entry = get_estimator(norm)
    o = options or Options()
    if has_matvec(op):
        return entry.run(op, gen, o)
    if entry.run_zo is None:
        validate(norm, "zo")
    return entry.run_zo(op, gen, o)  # type: ignore[misc]


__all__ = [
    "DISTRIBUTIONS",
    "ESTIMATORS",
    "EstimatorEntry",
    "LinearOperator",
    "NORMS",
    "Operator",
    "Options",
    "as_operator",
    "check_estimator_options",
    "estimate",
    "get_estimator",
    "hutchinson_frobenius",
    "hutchinson_trace",
    "lanczos",
    "random_vector",
    "rms",
    "validate",
    "zo_frobenius",
    "zo_rms",
    "zo_trace",
]
