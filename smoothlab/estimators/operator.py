r"""Linear operators the estimators act on, random probe vectors, and the Monte-Carlo loop.

An *operator* is anything with (curvlinops style)

* ``dim`` (int), ``dtype`` (torch dtype of the vectors), ``device``;
* ``matvec(v) -> H v`` for a flat vector ``v`` of length ``dim``;
* optionally ``quad(v) -> vᵀ H v`` (a float) when it is cheaper than ``v · matvec(v)``;
* optionally ``has_matvec = False`` when only ``quad`` is available (the ``zo`` oracle:
  second differences of function values);
* optionally ``kind`` (a name recorded in :attr:`Estimate.hvp`);
* optionally ``matvec_out = True`` when ``matvec(v, out=buf)`` writes H v into ``buf``
  (Lanczos passes its freed vector; the Monte-Carlo estimators a reused buffer).

The estimators pass random vectors in reused buffers: ``v`` is valid during the call only
(a callable that keeps it must copy it).

:class:`smoothlab.hvp.Oracle` is one; :func:`as_operator` turns a dense square tensor or a
plain callable ``v ↦ H v`` into one, so every estimator can be tested on ``lambda v: H @ v``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import UsageError
from ..estimate import Estimate
from ..perturb import get_source

Callback = Callable[[int, int], None]
DISTRIBUTIONS = ("gaussian", "rademacher")


@runtime_checkable
class Operator(Protocol):
    """What an estimator needs from H (see the module docstring)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class LinearOperator:
    """``H`` given by ``matvec`` (and optionally ``quad``); counts its calls in ``num_calls``."""

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor] | None,
        dim: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        quad: Callable[[torch.Tensor], float] | None = None,
        kind: str = "operator",
        checked: bool = False,
    ) -> None:
        if matvec is None and quad is None:
            raise UsageError("a LinearOperator needs matvec= or quad= (got neither)")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise UsageError(f"dim must be a positive integer, got {dim!r}")
        self._matvec, self._quad = matvec, quad
        self.dim, self.dtype, self.device, self.kind = dim, dtype, torch.device(device), kind
        self.has_matvec = matvec is not None
        self.num_calls = 0
        self.checked = checked  # a user's plain callable: check what it returns

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self._matvec is None:
            raise UsageError(f"operator {self.kind!r} gives quadratic forms vᵀHv only, not H v")
        self.num_calls += 1
        if not self.checked:
            return self._matvec(v)
        try:
            hv = self._matvec(v)
        except RuntimeError as e:  # H of another dtype/device than v: torch's addmv error
            if self.num_calls > 1:
                raise
            raise UsageError(self._refused(f"failed on its first vector ({e})")) from e
        if not isinstance(hv, torch.Tensor) or hv.shape != v.shape or hv.dtype != v.dtype:
            got = f"{hv.dtype} {tuple(hv.shape)}" if isinstance(hv, torch.Tensor) else type(hv)
            raise UsageError(self._refused(f"returned {got}"))
        return hv

    def _refused(self, what: str) -> str:
        return (
            f"the callable v -> H v {what}; it is given {self.dtype} vectors of shape "
            f"({self.dim},) on {self.device} and must return the same: pass dtype= and "
            "device= to the estimator when H is of another dtype or device (e.g. "
            "dtype=torch.float32 for a float32 H)"
        )

    def quad(self, v: torch.Tensor) -> float:
        if self._quad is not None:
            self.num_calls += 1
            return float(self._quad(v))
        return dot64(v, self.matvec(v))


def as_operator(
    op: Any, *, dim: int | None = None, dtype: torch.dtype | None = None, device: Any = None
) -> Any:
    """``op`` if it already is an operator; a square tensor ``H`` → ``v ↦ H v``; a callable
    ``v ↦ H v`` with ``dim=`` (and ``dtype=``, default float64, and ``device=``, default
    CPU: the vectors it is given). A callable that fails on its first vector or returns
    another shape or dtype is a UsageError telling to pass ``dtype=``/``device=``; those
    given for a tensor or an operator must match its own."""
    if isinstance(op, torch.Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise UsageError(
                f"a dense operator must be a square matrix, got shape {tuple(op.shape)}"
            )
        _same(op, dtype, device, "the dense H")
        return LinearOperator(
            lambda v: op @ v, op.shape[0], dtype=op.dtype, device=op.device, kind="dense"
        )
    if hasattr(op, "dim") and (hasattr(op, "matvec") or hasattr(op, "quad")):
        _same(op, dtype, device, "the operator")
        return op
    if callable(op):
        if dim is None:
            raise UsageError("a plain callable operator v -> H v needs dim=")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise UsageError(f"dtype must be a torch dtype such as torch.float32, got {dtype!r}")
        return LinearOperator(
            op, dim, dtype=dtype or torch.float64, device=device or "cpu", checked=True
        )
    raise TypeError(
        f"expected an operator (dim, dtype, device, matvec), a square tensor or a callable, "
        f"got {type(op).__name__}"
    )


def _same(op: Any, dtype: Any, device: Any, what: str) -> None:
    """UsageError when ``dtype=``/``device=`` were given and differ from ``op``'s own."""
    if dtype is not None and dtype != op.dtype:
        raise UsageError(f"dtype={dtype} given, but {what} is {op.dtype}; omit dtype=")
    if device is not None and torch.device(device) != torch.device(op.device):
        raise UsageError(f"device={device} given, but {what} is on {op.device}; omit device=")


def has_matvec(op: Any) -> bool:
    """Whether ``op`` gives H v (the ``zo`` oracle gives only vᵀHv)."""
    return bool(getattr(op, "has_matvec", True)) and hasattr(op, "matvec")


_DOT_BUFFERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


_ROW = 128  # entries per float32 partial sum of dot64's CPU path


def release_dot_buffers() -> None:
    """Drop :func:`dot64`'s reusable float64 buffers (rebuilt on next use)."""
    _DOT_BUFFERS.clear()


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """aᵀb accumulated in float64 (a float32 dot over 10⁷ entries loses digits, and those
    errors put Ritz values outside the spectrum), without a full float64 copy.

    On CPU, float32: one batched matmul gives float32 dots of 128-entry rows (error about
    √128·ε₃₂ of each row's Σ|a_i b_i|), summed in float64: 4e-11 of Σ|a_i b_i| over 22.7M
    entries, at the cost of one read of each vector (2.2× faster than the chunked copies).
    Elsewhere: chunks are copied into two reusable float64 buffers per device (a fresh
    ``.double()`` per chunk cost 7x more on CPU, in page faults); on CUDA the batched matmul
    could run in TF32. Not thread-safe (the buffers are shared)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return float(torch.dot(a, b))
    n = a.numel()
    cpu32 = a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
    if cpu32 and a.is_contiguous() and b.is_contiguous() and n >= _ROW:
        a, b = a.view(-1), b.view(-1)
        m = n // _ROW
        rows = torch.bmm(a[: m * _ROW].view(m, 1, _ROW), b[: m * _ROW].view(m, _ROW, 1))
        tail = torch.dot(a[m * _ROW :].double(), b[m * _ROW :].double())
        return float(rows.sum(dtype=torch.float64)) + float(tail)
    step = max(1, min(n, (1 << 16) if a.device.type == "cpu" else (1 << 22)))
    bufs = _DOT_BUFFERS.get(a.device)
    if bufs is None or bufs[0].numel() < step:
        bufs = tuple(torch.empty(step, dtype=torch.float64, device=a.device) for _ in range(2))
        _DOT_BUFFERS[a.device] = bufs
    x, y = bufs
    total = 0.0
    for i in range(0, n, step):
        m = min(step, n - i)
        x[:m].copy_(a[i : i + m])
        if b is a:
            total += float(torch.dot(x[:m], x[:m]))
            continue
        y[:m].copy_(b[i : i + m])
        total += float(torch.dot(x[:m], y[:m]))
    return total


def quad_form(op: Any, v: torch.Tensor) -> float:
    """vᵀHv: ``op.quad`` when it has one, else v · (H v) accumulated in float64."""
    quad = getattr(op, "quad", None)
    if quad is not None:
        return float(quad(v))
    return dot64(v, op.matvec(v))


# --- random vectors ---------------------------------------------------------------------------
_RADEMACHER = get_source("rademacher").sampler()  # reuses its sign table across calls


def random_vector(
    kind: str,
    dim: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A random vector: ``gaussian`` N(0, I), ``rademacher`` ±1, ``unit`` uniform on the sphere.

    Rademacher signs are :mod:`smoothlab.perturb`'s ``rademacher`` source (64 signs per random
    word, expanded by a table lookup: about one pass over the output, against ``randn``'s
    several), seeded by one 63-bit draw from ``gen``. ``out``: a buffer from
    :func:`vector_buffer` to write into (a fresh tensor costs page faults on CPU); the
    result is then a view of it.
    """
    if kind == "rademacher":
        seed = int(torch.randint(0, 2**63 - 1, (), generator=gen, device=gen.device))
        direction = _RADEMACHER(seed)
        if out is None:
            return direction(0, torch.empty(dim, dtype=dtype, device=device))
        return direction.fill(0, out[:dim], out)[:dim]
    v = torch.randn(
        dim, generator=gen, device=device, dtype=dtype, out=None if out is None else out[:dim]
    )
    if kind == "unit":
        v /= v.norm()
    return v


def vector_buffer(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable buffer for :func:`random_vector` ``out=`` (padded for packed sign words)."""
    return torch.empty(_RADEMACHER(0).padded(dim), dtype=dtype, device=device)


def matvec_into(op: Any, v: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """H v, written into ``out`` when the operator takes ``out=`` (``op.matvec_out``)."""
    if out is not None and getattr(op, "matvec_out", False):
        return op.matvec(v, out=out)
    return op.matvec(v)


_NO_GEN = object()  # check_estimator_options' default: no generator to check


def check_estimator_options(
    num_vectors: object,
    *,
    tol: object = None,
    target_rel_stderr: object = None,
    min_vectors: object = 1,
    count: str = "num_vectors",
    gen: object = _NO_GEN,
) -> None:
    """UsageError naming the first bad estimator option: ``num_vectors`` (called ``count``,
    e.g. ``max_iter``) and ``min_vectors`` positive integers (numpy integers too), ``tol``
    and ``target_rel_stderr`` positive finite numbers (or None), and ``gen``, when given, a
    ``torch.Generator`` (randomness goes through a generator the caller seeds: None would
    silently use torch's global RNG). The one check behind
    :func:`smoothlab.probe.check_options` and every public estimator."""
    if gen is not _NO_GEN and not isinstance(gen, torch.Generator):
        raise UsageError(
            f"gen must be a torch.Generator, got {type(gen).__name__} {gen!r:.40}; pass "
            "torch.Generator().manual_seed(s) (on the operator's device)"
        )
    for name, v in ((count, num_vectors), ("min_vectors", min_vectors)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("tol", tol), ("target_rel_stderr", target_rel_stderr)):
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf
        if v is not None and not ok:
            none = " or None" if name == "target_rel_stderr" else ""
            raise UsageError(f"{name} must be a positive finite float{none}, got {v!r}")


def check_distribution(distribution: str, accepted: tuple[str, ...] = DISTRIBUTIONS) -> None:
    if distribution not in accepted:
        raise UsageError(f"unknown distribution {distribution!r}; accepted: {', '.join(accepted)}")


# --- Monte-Carlo loop ---------------------------------------------------------------------------
# The fewest samples before a target_rel_stderr may stop the loop. The rule stops sooner
# when the estimate happens to lie far from 0, so a stopped estimate leans outward: on a
# 30×30 H with eigenvalues 10, −6, 4 and small ones, at a 0.2 target, a Hutchinson trace came
# out 7% high from a minimum of 5 samples and 6% high from 10 (its spread 23%, the target's
# 20%), a bias a user who stops early accepts; a zo ‖H‖_F stopped after a median 39 samples
# with spread 19% and |error| ≤ stderr in 68% of 400 runs (from 5: 15% low, spread 39%).
MIN_VECTORS = 10


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error s/√n (nan for n < 2).

    A standard error, not an interval: s is itself estimated, so (mean − μ)/(s/√n) follows
    Student's t with n − 1 degrees of freedom (for Gaussian samples), not N(0, 1). A 95%
    interval is ± t_{n−1} · stderr: t = 12.7 (n = 2), 4.30 (3), 3.18 (4), 2.78 (5),
    2.57 (6), 2.36 (8), 2.26 (10), 2.09 (20), against 1.96; ± 1 stderr holds the mean
    with probability 50% at n = 2, 63% at 5 and 66% at 10 (68% as n → ∞). Hutchinson
    samples are skewed, so small n does worse still (a Gaussian-vector trace at n = 2: 43%
    within 1 stderr, 65% within 2)."""
    n = len(x)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan)


def sqrt_of_mean(sq: float, sq_se: float) -> tuple[float, float]:
    """√m and its delta-method stderr se(m)/(2√m) (0 for m = 0 known exactly: a zero H)."""
    value = math.sqrt(max(sq, 0.0))
    return value, (sq_se / (2 * value) if value > 0 else (0.0 if sq_se == 0 else math.nan))


def monte_carlo(
    op: Any,
    norm: str,
    draw: Callable[[], float],
    finish: Callable[[np.ndarray], tuple[float, float]],
    *,
    num_vectors: int,
    target_rel_stderr: float | None = None,
    min_vectors: int = MIN_VECTORS,
    callback: Callback | None = None,
    extra: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> Estimate:
    """The Monte-Carlo loop every sampling estimator shares: draw up to ``num_vectors``
    samples, stop once stderr/|value| ≤ ``target_rel_stderr`` (after ``min_vectors``), and
    return the :class:`Estimate` of ``norm``. ``finish`` maps the samples to (value, stderr);
    ``extra`` maps them to further Estimate fields (the ``zo`` rounding diagnostics)."""
    xs: list[float] = []
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
    return Estimate(
        value=value,
        stderr=se,
        num_hvp=len(xs),
        norm=norm,
        hvp=getattr(op, "kind", "operator"),
        dim=op.dim,
        samples=tuple(xs),
        converged=reached,
        **(extra(arr) if extra is not None else {}),
    )


def mean_sqrt(x: np.ndarray) -> tuple[float, float]:
    """√(mean x) and its delta-method stderr (the ``frobenius``/``rms`` finish)."""
    return sqrt_of_mean(*mean_se(x))
