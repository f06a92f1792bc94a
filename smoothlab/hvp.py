"""Hessian-vector-product oracles restricted to one block: v ↦ ∇²_bb f · v.

Every oracle works on flat vectors over the block's parameters, perturbs only the block,
reads only the block's gradient, and leaves every parameter bit-identical (see
:mod:`smoothlab.perturb`). Oracles (``HVPS``):

* ``fd``:          H v ≈ (∇_b f(x + h v) − ∇_b f(x)) / h        (∇_b f(x) computed once)
* ``fd-central``:  H v ≈ (∇_b f(x + h v) − ∇_b f(x − h v)) / 2h
* ``exact``:       H v = ∇_b ⟨∇_b f(x), v⟩ (double backward; the first-order graph is kept
                   and reused across vectors). Attention runs on a twice-differentiable path.
* ``zo``:          function values only. No H v; the directional curvature
                   c(v) = (f(x + h v) − 2 f(x) + f(x − h v)) / h² = vᵀ H_bb v + O(h²),
                   at inference memory.

Default step ``h`` (when not given): the displacement ``h‖v‖`` is ``ε^p · max(‖x_b‖, 1)``
with ε the machine epsilon of the coarser of the block's dtype and the loss's dtype (a float64
model whose loss is computed in float32, as Hugging Face causal-LM losses are, gets the float32
step) and p = 1/2 (forward), 1/3 (central), 1/4 (second difference) — the classic
truncation/rounding balance for each formula.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .perturb import shifted

HVPS = ("fd", "fd-central", "exact", "zo")
_ORDER = {"fd": 1 / 2, "fd-central": 1 / 3, "zo": 1 / 4}
_FLASH = ("flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(vec[i : i + n].view(p.shape))
        i += n
    return out


def compute_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 for float64 blocks, else float32 (half precision is upcast for the vectors)."""
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


def default_step(
    kind: str, params: Sequence[torch.Tensor], loss_dtype: torch.dtype | None = None
) -> float:
    """The displacement length ε^p · max(‖x_b‖, 1) for oracle ``kind``.

    ε = max(eps(params dtype), eps(loss_dtype)): rounding in f (or ∇f) sets the error floor.
    """
    eps = torch.finfo(params[0].dtype).eps
    if loss_dtype is not None and loss_dtype.is_floating_point:
        eps = max(eps, torch.finfo(loss_dtype).eps)
    xnorm = math.sqrt(sum(float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2 for p in params))
    return eps ** _ORDER[kind] * max(xnorm, 1.0)


@contextlib.contextmanager
def differentiable_attention(root: nn.Module | None) -> Iterator[None]:
    """Run attention on a path with a double backward, then restore the model's setting.

    PyTorch's fused SDPA kernels (flash, memory-efficient, and the CPU flash kernel) have no
    double backward, so SDPA is pinned to its math backend; a Hugging Face model configured
    for a flash/flex kernel is switched to ``sdpa`` for the duration.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched = []
    if root is not None:
        for module in root.modules():
            cfg = getattr(module, "config", None)
            impl = getattr(cfg, "_attn_implementation", None)
            if impl in _FLASH and hasattr(module, "set_attn_implementation"):
                module.set_attn_implementation("sdpa")
                switched.append((module, impl))
                break
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for module, impl in switched:
            module.set_attn_implementation(impl)


@contextlib.contextmanager
def grad_enabled_for(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily set ``requires_grad=True`` on ``params`` (frozen base weights included)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def scalar_loss(loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``loss_fn()`` as a 0-d tensor; TypeError naming what came back if it is not a scalar."""
    loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    return loss.reshape(())


def block_gradients(
    loss_fn: Callable[[], torch.Tensor], blocks: Mapping[str, Sequence[torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """∇_b f(x) (flat, in each block's compute dtype) for every block from ONE backward pass,
    and the loss's dtype. Frozen parameters get ``requires_grad`` only for the duration."""
    params = [p for ps in blocks.values() for p in ps]
    with grad_enabled_for(params), torch.enable_grad():
        loss = scalar_loss(loss_fn)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    out, i = {}, 0
    for name, ps in blocks.items():
        pieces = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[i : i + len(ps)], ps)]
        out[name] = flatten(pieces, compute_dtype(ps))
        i += len(ps)
    return out, loss.dtype


class Oracle:
    """Block-restricted curvature oracle. Use as a context manager around its calls.

    ``hvp(v)`` returns H_bb v (flat); ``quad(v)`` returns vᵀ H_bb v. ``num_hvp`` counts
    oracle calls (an HVP, or one second difference for ``zo``).
    """

    def __init__(
        self,
        kind: str,
        loss_fn: Callable[[], torch.Tensor],
        params: Sequence[torch.Tensor],
        *,
        h: float | None = None,
        root: nn.Module | None = None,
        gradient: tuple[torch.Tensor, torch.dtype] | None = None,
    ) -> None:
        """``gradient``: ∇_b f(x) (flat) and the loss's dtype, when the caller already has them
        (``probe`` computes one joint backward for all blocks of an ``fd`` probe)."""
        if kind not in HVPS:
            raise ValueError(f"unknown hvp oracle {kind!r}; accepted: {', '.join(HVPS)}")
        if h is not None and not (isinstance(h, int | float) and h > 0 and math.isfinite(h)):
            raise ValueError(f"h must be a positive finite float, got {h!r}")
        self.kind = kind
        self.loss_fn = loss_fn
        self.params = list(params)
        self.h = h
        self.root = root
        self.dtype = compute_dtype(self.params)
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.num_hvp = 0
        self._stack: contextlib.ExitStack | None = None
        self._g0: torch.Tensor | None = None
        self._f0: float | None = None
        self._graph: tuple[torch.Tensor, ...] | None = None
        self._step: float | None = None  # set once the loss's dtype is known
        self._loss_dtype: torch.dtype | None = None
        if gradient is not None:
            self._g0, self._loss_dtype = gradient[0].to(self.dtype), gradient[1]
        if kind != "exact" and self.params[0].dtype in (torch.float16, torch.bfloat16):
            warnings.warn(
                f"hvp={kind!r} on a {self.params[0].dtype} block: finite differences in half "
                f"precision (eps={torch.finfo(self.params[0].dtype).eps:.1e}) are unreliable; "
                "use hvp='exact' or cast the model to float32 for the probe",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- context ---------------------------------------------------------------------
    def __enter__(self) -> Oracle:
        self._stack = contextlib.ExitStack()
        if self.kind != "zo":
            self._stack.enter_context(grad_enabled_for(self.params))
        if self.kind == "exact":
            self._stack.enter_context(differentiable_attention(self.root))
        return self

    def __exit__(self, *exc: object) -> None:
        self._graph = None
        self._g0 = None
        assert self._stack is not None
        self._stack.close()

    # -- helpers ---------------------------------------------------------------------
    def step_for(self, v: torch.Tensor) -> float:
        """h used for direction v: the user's h, or the default displacement / ‖v‖."""
        if self.h is not None:
            return float(self.h)
        if self.kind not in _ORDER:
            return 0.0
        if self._step is None:
            if self._loss_dtype is None:
                self._value_at(None, 0.0)  # one forward to learn the loss's dtype
            self._step = default_step(self.kind, self.params, self._loss_dtype)
        return self._step / max(float(v.norm()), 1e-30)

    def _loss(self) -> torch.Tensor:
        loss = scalar_loss(self.loss_fn)
        self._loss_dtype = loss.dtype
        return loss

    def _grad(self) -> torch.Tensor:
        with torch.enable_grad():
            loss = self._loss()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return flatten(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)], self.dtype
        )

    def _grad_at(self, v: torch.Tensor, s: float) -> torch.Tensor:
        with shifted(self.params, unflatten(v, self.params), s, self.root):
            return self._grad()

    def _value_at(self, v: torch.Tensor | None, s: float) -> float:
        with torch.no_grad():
            if v is None:
                return float(self._loss().double())
            with shifted(self.params, unflatten(v, self.params), s, self.root):
                return float(self._loss().double())

    def gradient(self) -> torch.Tensor:
        """∇_b f(x) as a flat vector (cached)."""
        if self._g0 is None:
            self._g0 = self._grad()
        return self._g0

    def cached_grad_norm(self) -> float:
        """‖∇_b f(x)‖₂ if this oracle already computed the gradient (``fd``, ``exact``), else nan."""
        if self._g0 is not None:
            return float(torch.linalg.vector_norm(self._g0, dtype=torch.float64))
        if self._graph is not None:
            return math.sqrt(sum(float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64)) ** 2 for g in self._graph))
        return math.nan

    # -- oracle calls ----------------------------------------------------------------
    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H_bb v for a flat vector v (not available for ``zo``)."""
        if self.kind == "zo":
            raise ValueError("hvp='zo' gives quadratic forms vᵀHv only; use norm='trace' or 'frobenius'")
        self.num_hvp += 1
        if self.kind == "exact":
            if self._graph is None:
                with torch.enable_grad():
                    loss = self._loss()
                    grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                self._graph = tuple(
                    torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)
                )
            pieces = unflatten(v, self.params)
            with torch.enable_grad():
                needs = [g.requires_grad for g in self._graph]
                if not any(needs):
                    return torch.zeros_like(v)
                hv = torch.autograd.grad(
                    [g for g, n in zip(self._graph, needs) if n],
                    self.params,
                    grad_outputs=[w.to(g.dtype) for w, g, n in zip(pieces, self._graph, needs) if n],
                    retain_graph=True,
                    allow_unused=True,
                )
            return flatten([torch.zeros_like(p) if x is None else x for x, p in zip(hv, self.params)], self.dtype)
        if self.kind == "fd":
            g0 = self.gradient()  # also tells step_for the loss's dtype
            s = self.step_for(v)
            return self._grad_at(v, s).sub_(g0).div_(s)  # in place: block-sized temporaries are costly
        s = self.step_for(v)
        return self._grad_at(v, s).sub_(self._grad_at(v, -s)).div_(2 * s)

    def quad(self, v: torch.Tensor) -> float:
        """vᵀ H_bb v: from an HVP, or (``zo``) from a second difference of f."""
        if self.kind != "zo":
            return float(torch.dot(v.to(torch.float64), self.hvp(v).to(torch.float64)))
        self.num_hvp += 1
        if self._f0 is None:
            self._f0 = self._value_at(None, 0.0)  # also tells step_for the loss's dtype
        s = self.step_for(v)
        fp = self._value_at(v, s)
        fm = self._value_at(v, -s)
        return (fp - 2.0 * self._f0 + fm) / (s * s)
