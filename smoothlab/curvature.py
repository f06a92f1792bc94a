r"""The curvature measurements the learning-rate advisor needs, from a loss closure.

``measure(loss_fn, x_params, y_params, hvp=...)`` returns a :class:`Curvature` with, for the
zeroth-order block x and the first-order block y (either may be empty):

* ``grad_norm_x``, ``grad_norm_y``: ‖g_x‖, ‖g_y‖ (one joint backward; ``zo``: ‖g_x‖² from the
  directional derivatives, E(gᵀz)² = ‖g‖² for E zzᵀ = I);
* ``trace_x``: tr H_xx by Hutchinson, :func:`smoothlab.probe` with ``norm="trace"``;
* ``L_x``, ``L_y``: ‖H_xx‖₂, ‖H_yy‖₂ by Lanczos, ``probe(..., norm="spectral")`` (not with ``zo``);
* ``rho_x`` = g_xᵀH_xx g_x/‖g_x‖², ``rho_y`` = g_yᵀH_yy g_y/‖g_y‖² and the mixed term
  ``cross`` = g_xᵀH_xy g_y: two HVPs of the joint Hessian over x ∪ y, along w_x = (g_x, 0)
  and w_y = (0, g_y): H w_x = (H_xx g_x, H_yx g_x), H w_y = (H_xy g_y, H_yy g_y), so
  cross = g_yᵀ(H w_x)_y = g_xᵀ(H w_y)_x (two estimates, averaged; ``cross_mismatch`` is
  their difference, a finite-difference accuracy check). Not with ``zo``: g is unknown, and
  a second difference along an SPSA estimate of g sees mostly its noise (‖ĝ − g‖² ≈ d‖g‖²/n
  after n directions), so ρ_x is omitted there (its share of the denominator is ≤ (q+1)/r_x);
* ``delta_x`` = Σ_a g_a² H_aa/‖g‖² for non-Gaussian z (κ ≠ 3): Hutchinson with u = g ∘ v,
  v Rademacher, E uᵀHu = Σ g_a² H_aa;
* ``second_moment_x`` (optional, ``second_moment_samples`` > 0): the direct estimate
  m₁ = E[(gᵀz)² zᵀHz]/‖g‖² (= tr H + 2ρ + (κ−3)δ) from sampled directions: each sample is
  the quadratic form of ĝ = (gᵀz) z (an HVP, or with ``zo`` a second difference along ĝ and a
  central difference for gᵀz), as a ratio mean((gᵀz)² zᵀHz)/mean((gᵀz)²) (``zo``), or over
  the exact ‖g‖² otherwise.

Every parameter is bit-identical afterwards (the oracles and the probe guarantee it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .blocks import check_blocks
from .errors import UsageError
from .estimate import Estimate
from .estimators.operator import dot64
from .hvp import HVPS, Oracle, check_step, default_step
from .probe import _owning_module, check_seed, eval_mode, probe

Z_KINDS = {"gaussian": 3.0, "rademacher": 1.0}


def _sampling_kind(z: str) -> str:
    """The direction law measured for the training source ``z``: Gaussian-like sources
    (kurtosis 3: ``gaussian``, ``table``) are sampled as Gaussian, the ±1 sources (kurtosis 1:
    ``rademacher``, ``hash``) as Rademacher; only E z⁴ enters the advisor's formulas."""
    if z in Z_KINDS:
        return z
    from .perturb import SOURCES, get_source

    if z not in SOURCES:
        raise UsageError(f"unknown z source {z!r}; accepted: {', '.join(SOURCES)}")
    return "gaussian" if get_source(z).kurtosis == 3.0 else "rademacher"


nan = math.nan


@dataclass(frozen=True)
class Curvature:
    """What :func:`measure` found (nan/None where not measured)."""

    hvp: str
    d_x: int
    d_y: int
    loss: float
    grad_norm_x: float = nan
    grad_norm_y: float = nan
    weight_norm_x: float = nan  # ‖x‖ (the random-walk cap compares the SPSA noise with it)
    grad_rms_x: float = nan  # √E_ξ‖g_ξ‖² over minibatches, when measured (else ‖g_x‖ is used)
    signal_y: float = nan  # φ_y = ‖E g_ξ‖²/E‖g_ξ‖² of y over minibatches, when measured
    signal_y_stderr: float = nan
    trace_x: Estimate | None = None
    L_x: Estimate | None = None
    L_y: Estimate | None = None
    rho_x: float = nan
    rho_y: float = nan
    cross: float = nan
    cross_mismatch: float = nan
    delta_x: float = nan
    delta_x_stderr: float = nan
    kurtosis: float = 3.0
    second_moment_x: float = nan
    second_moment_x_stderr: float = nan
    seconds: float = 0.0

    @property
    def r_x(self) -> float:
        """Effective dimension tr H_xx / L_x."""
        if self.trace_x is None or self.L_x is None or not self.L_x.value:
            return nan
        return self.trace_x.value / self.L_x.value

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("trace_x", "L_x", "L_y"):
            est = getattr(self, k)
            d[k] = (
                None
                if est is None
                else {kk: vv for kk, vv in est.as_dict().items() if kk != "samples"}
            )
        d["r_x"] = self.r_x
        return d

    def advice_inputs(self, *, use_second_moment: bool | None = None) -> dict:
        """Keyword arguments for :func:`smoothlab.advisor.advise` (L_x, L_y, d_x and the rest).

        ``use_second_moment``: feed m₁ instead of the trace (default: only with ``zo``)."""
        use_m1 = (self.hvp == "zo") if use_second_moment is None else use_second_moment
        est = lambda e: (e.value, e.stderr) if e is not None else (None, nan)  # noqa: E731
        lx, lxs = est(self.L_x)
        ly, lys = est(self.L_y)
        tr, trs = est(self.trace_x)
        kw: dict = dict(
            L_x=lx if self.d_x else None,
            L_y=ly if self.d_y else None,
            d_x=self.d_x,
            L_x_stderr=lxs,
            L_y_stderr=lys,
            kurtosis=self.kurtosis,
            trace=tr,
            trace_stderr=trs,
        )
        if use_m1 and math.isfinite(self.second_moment_x):
            kw.update(
                second_moment=self.second_moment_x, second_moment_stderr=self.second_moment_x_stderr
            )
        fin = lambda v: v if math.isfinite(v) else None  # noqa: E731
        rho = 0.0 if self.hvp == "zo" else fin(self.rho_x)  # zo: omitted (see module docstring)
        kw.update(
            rho_x=rho,
            # ρ_x from an HVP along g is exact on the probed batch (stderr 0); zo's 0 is an
            # omission of unknown size, not a measurement (stderr nan)
            rho_x_stderr=nan if self.hvp == "zo" or rho is None else 0.0,
            delta_x=fin(self.delta_x),
            delta_x_stderr=self.delta_x_stderr,
            rho_y=fin(self.rho_y),
            grad_norm_x=fin(self.grad_norm_x) if self.d_x else None,
            weight_norm_x=fin(self.weight_norm_x) if self.d_x else None,
            grad_rms_x=fin(self.grad_rms_x) if self.d_x else None,
            grad_norm_y=fin(self.grad_norm_y) if self.d_y else None,
            signal_y=fin(self.signal_y) if self.d_y else None,
            signal_y_stderr=self.signal_y_stderr,
            cross=fin(self.cross),
        )
        return kw


def _random(
    kind: str, dim: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, (dim,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)
    return torch.randn(dim, generator=gen, device=device, dtype=dtype)


def _mean_se(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else nan)


def _ratio_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a)/mean(b) and its delta-method standard error."""
    r = float(a.mean() / b.mean())
    n = a.size
    if n < 2:
        return r, nan
    resid = a - r * b
    return r, float(resid.std(ddof=1) / (math.sqrt(n) * abs(b.mean())))


def _gradient_terms(
    oracle: Oracle,
    d_x: int,
    d_y: int,
    gen: torch.Generator,
    *,
    kind: str,
    second_moment_samples: int,
    delta_samples: int,
) -> dict:
    """‖g_x‖, ‖g_y‖, ρ_x, ρ_y, cross, δ_x and m₁ from an HVP oracle over x ∪ y."""
    g = oracle.gradient()
    gx, gy = g[:d_x], g[d_x:]
    gx2, gy2 = dot64(gx, gx), dot64(gy, gy)
    out: dict = {
        "grad_norm_x": math.sqrt(gx2) if d_x else nan,
        "grad_norm_y": math.sqrt(gy2) if d_y else nan,
    }
    dot = dot64
    crosses = []
    if d_x and gx2 > 0:
        hw = oracle.hvp(torch.cat([gx, torch.zeros_like(gy)]))
        out["rho_x"] = dot(gx, hw[:d_x]) / gx2
        if d_y:
            crosses.append(dot(gy, hw[d_x:]))
    if d_y and gy2 > 0:
        hw = oracle.hvp(torch.cat([torch.zeros_like(gx), gy]))
        out["rho_y"] = dot(gy, hw[d_x:]) / gy2
        if d_x:
            crosses.append(dot(gx, hw[:d_x]))
    if len(crosses) == 2:
        out["cross"], out["cross_mismatch"] = (
            0.5 * (crosses[0] + crosses[1]),
            crosses[0] - crosses[1],
        )

    def quad_x(u: torch.Tensor) -> float:
        return dot(u, oracle.hvp(torch.cat([u, torch.zeros_like(gy)]))[:d_x])

    if d_x and gx2 > 0 and delta_samples:
        vals = [
            quad_x(gx * _random("rademacher", d_x, gen, gx.dtype, gx.device)) / gx2
            for _ in range(delta_samples)
        ]
        out["delta_x"], out["delta_x_stderr"] = _mean_se(vals)
    if d_x and gx2 > 0 and second_moment_samples:
        vals = []
        for _ in range(second_moment_samples):
            z = _random(kind, d_x, gen, gx.dtype, gx.device)
            vals.append(quad_x(z.mul_(dot(gx, z))) / gx2)
        out["second_moment_x"], out["second_moment_x_stderr"] = _mean_se(vals)
    return out


def _zo_terms(
    loss_fn: Callable[[], torch.Tensor],
    x: list[torch.Tensor],
    gen: torch.Generator,
    *,
    kind: str,
    samples: int,
    root: nn.Module | None,
    h: float | None,
) -> dict:
    """‖g_x‖ and m₁ from function values only: gᵀz by a central difference, the quadratic
    form of ĝ = (gᵀz) z by :meth:`Oracle.quad` (a second difference)."""
    if not samples:
        return {}
    a2, q = [], []
    with torch.no_grad():
        loss_dtype = loss_fn().dtype
    step = h if h is not None else default_step("fd-central", x, loss_dtype)
    with Oracle("zo", loss_fn, x, root=root, h=h) as oracle:
        for _ in range(samples):
            z = _random(kind, oracle.dim, gen, oracle.dtype, oracle.device)
            s = step if h is not None else step / float(z.norm())
            with torch.no_grad():
                with oracle.shifted(z, s):
                    fp = float(loss_fn().double())
                with oracle.shifted(z, -s):
                    fm = float(loss_fn().double())
            a = (fp - fm) / (2 * s)
            a2.append(a * a)
            q.append(oracle.quad(z.mul_(a)) if a else 0.0)
    a2_arr, q_arr = np.asarray(a2), np.asarray(q)
    m1, m1_se = _ratio_se(q_arr, a2_arr)
    g2, g2_se = _mean_se(a2)
    return {
        "grad_norm_x": math.sqrt(max(g2, 0.0)),
        "second_moment_x": m1,
        "second_moment_x_stderr": m1_se,
    }


def _params(name: str, ps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``ps`` as a list of tensors. A bare tensor or module is refused: ``list()`` of a
    Parameter is its 0-d slices, which are not leaves, so the measurement was silently 0."""
    if isinstance(ps, torch.Tensor | nn.Module) or not isinstance(ps, Sequence):
        raise UsageError(
            f"{name} must be a list of tensors (parameters), got a {type(ps).__name__}; "
            f"pass [p] for one tensor, list(m.parameters()) for a module"
        )
    ps = list(ps)
    if not all(isinstance(p, torch.Tensor) for p in ps):
        raise UsageError(
            f"{name} must be a list of tensors (parameters), got {[type(p).__name__ for p in ps][:3]}"
        )
    return ps


def _check_blocks_and_model(
    x: list[torch.Tensor], y: list[torch.Tensor], model: object, loss_fn: object, seed: object
) -> nn.Module | None:
    """The checks :func:`probe` makes, as UsageError: x and y share no parameter
    (:func:`check_blocks`), ``model`` is a module or None (:func:`_owning_module`; the owning
    module, else ``loss_fn.model``, is returned), ``seed`` an integer (numpy's too)."""
    check_seed(seed)
    check_blocks({k: v for k, v in (("x_params", x), ("y_params", y)) if v})
    try:
        return _owning_module(model, loss_fn)  # type: ignore[arg-type]
    except TypeError as e:
        raise UsageError(str(e)) from None


def _check_measure_args(
    hvp: str, z: str, trace_vectors: int, spectral_iters: int, second_moment_samples: int
) -> str:
    """Validate :func:`measure`'s options; the normalised SPSA direction kind."""
    if hvp not in HVPS:
        raise UsageError(f"unknown hvp {hvp!r}; accepted: {', '.join(HVPS)}")
    z = _sampling_kind(z)
    for name, v in (("trace_vectors", trace_vectors), ("spectral_iters", spectral_iters)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    n = second_moment_samples
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise UsageError(
            f"second_moment_samples must be an integer >= 0, got {second_moment_samples!r}"
        )
    return z


def _hessian_terms(
    loss_fn: Callable[[], torch.Tensor],
    x: list[torch.Tensor],
    y: list[torch.Tensor],
    gen: torch.Generator,
    z: str,
    spectral_iters: int,
    delta_samples: int,
    second_moment_samples: int,
    common: dict,
) -> dict:
    """L_x, L_y (Lanczos) and the gradient-direction terms, from Hessian-vector products."""
    hvp, root, h = common["hvp"], common["model"], common["h"]
    d_x, d_y = sum(p.numel() for p in x), sum(p.numel() for p in y)
    out: dict = {}
    blocks = {k: v for k, v in (("x", x), ("y", y)) if v}
    L = probe(loss_fn, blocks, norm="spectral", num_vectors=spectral_iters, **common)
    out.update(L_x=L.get("x"), L_y=L.get("y"))
    with eval_mode(root), Oracle(hvp, loss_fn, x + y, root=root, h=h) as oracle:
        out.update(
            _gradient_terms(
                oracle,
                d_x,
                d_y,
                gen,
                kind=z,
                second_moment_samples=second_moment_samples,
                delta_samples=delta_samples,
            )
        )
    return out


def _trace_x(
    loss_fn: Callable[[], torch.Tensor], x: list[torch.Tensor], trace_vectors: int, common: dict
):
    """Hutchinson tr H_xx: Gaussian vectors for ``zo``, else Rademacher (lower variance)."""
    dist = "gaussian" if common["hvp"] == "zo" else "rademacher"
    return probe(
        loss_fn, {"x": x}, norm="trace", num_vectors=trace_vectors, distribution=dist, **common
    )["x"]


def weight_norm(x: Sequence[torch.Tensor]) -> float:
    """‖x‖₂ over all base-block tensors, accumulated in float64."""
    return math.sqrt(
        sum(float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2 for p in x)
    )


def measure(
    loss_fn: Callable[[], torch.Tensor],
    x_params: Sequence[torch.Tensor],
    y_params: Sequence[torch.Tensor] = (),
    *,
    hvp: str = "fd",
    trace_vectors: int = 10,
    spectral_iters: int = 10,
    second_moment_samples: int = 0,
    z: str = "gaussian",
    seed: int = 0,
    h: float | None = None,
    model: nn.Module | None = None,
) -> Curvature:
    """Measure what the advisor needs at the current parameters (see module docstring).

    ``hvp``: ``fd`` / ``fd-central`` / ``exact`` (Hessian-vector products; everything is
    measured) or ``zo`` (function values only: ``trace_x``, and with ``second_moment_samples``
    also ‖g_x‖ and m₁; no L, ρ, cross, and nothing for y). ``z``: the SPSA direction
    distribution the training uses (``gaussian`` κ = 3, ``rademacher`` κ = 1); κ ≠ 3 adds the
    δ_x measurement (``trace_vectors`` HVPs). ``trace_vectors``: Hutchinson vectors (Rademacher
    for ``fd``/``exact``, the lower-variance choice; Gaussian for ``zo``). ``spectral_iters``:
    Lanczos iterations per block. ``seed`` seeds every random vector (no global RNG).
    """
    import time

    z = _check_measure_args(hvp, z, trace_vectors, spectral_iters, second_moment_samples)
    check_step(h)
    trace_vectors, spectral_iters = int(trace_vectors), int(spectral_iters)  # numpy's too
    second_moment_samples = int(second_moment_samples)
    x, y = _params("x_params", x_params), _params("y_params", y_params)
    if not x and not y:
        raise UsageError("both x_params and y_params are empty: nothing to measure")
    root = _check_blocks_and_model(x, y, model, loss_fn, seed)
    seed = int(seed)
    d_x, d_y = sum(p.numel() for p in x), sum(p.numel() for p in y)
    kappa = Z_KINDS[z]
    start = time.perf_counter()
    gen = torch.Generator(device=(x or y)[0].device).manual_seed(seed)
    with eval_mode(root), torch.no_grad():
        loss = float(loss_fn().double())
    common = dict(hvp=hvp, seed=seed, h=h, model=root)
    out: dict = {}
    if d_x:
        out["trace_x"] = _trace_x(loss_fn, x, trace_vectors, common)
    if hvp == "zo":
        samples = second_moment_samples if d_x else 0
        out.update(_zo_terms(loss_fn, x, gen, kind=z, samples=samples, root=root, h=h))
    else:
        delta_samples = trace_vectors if kappa != 3 else 0
        args = (z, spectral_iters, delta_samples, second_moment_samples, common)
        out.update(_hessian_terms(loss_fn, x, y, gen, *args))
    if d_x:
        out["weight_norm_x"] = weight_norm(x)
    return Curvature(
        hvp=hvp,
        d_x=d_x,
        d_y=d_y,
        loss=loss,
        kurtosis=kappa,
        seconds=time.perf_counter() - start,
        **out,
    )
