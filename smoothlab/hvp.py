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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .estimators.operator import dot64, random_vector
from .perturb import outside_reads, owners, row_wise, shifted

HVPS = ("fd", "fd-central", "exact", "zo")
_ORDER = {"fd": 1 / 2, "fd-central": 1 / 3, "zo": 1 / 4}
_REDUCERS: list[Callable[[torch.Tensor], None]] = []


@contextlib.contextmanager
def gradient_reduction(reduce: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Inside, the ``fd`` fast path hands each gradient it takes, as one flat tensor, to
    ``reduce`` (in place) before using it. That path differentiates with respect to leaf
    copies of the parameters and embedding rows, which hooks on the parameters never see;
    a data-parallel caller that sums gradients over ranks with such hooks
    (``smoothlab.hybrid.distributed.global_gradients``) sums these here."""
    _REDUCERS.append(reduce)
    try:
        yield
    finally:
        _REDUCERS.pop()


_FLASH = ("flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")


def flatten(
    tensors: Sequence[torch.Tensor],
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concatenate tensors into one flat vector (into ``out`` when given)."""
    pieces = [t.reshape(-1).to(dtype or t.dtype) for t in tensors]
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


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


_HALF = (torch.float16, torch.bfloat16)


def model_dtype(root: nn.Module | None) -> torch.dtype | None:
    """The least precise floating dtype of ``root``'s parameters (None without a module or
    floating parameters): the precision its forward computes in. A float32 block (LoRA
    adapters, which peft keeps in float32) inside a bf16 model sees bf16 rounding in f."""
    if root is None:
        return None
    dtypes = {p.dtype for p in root.parameters() if p.dtype.is_floating_point}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=None)


def default_step(
    kind: str,
    params: Sequence[torch.Tensor],
    loss_dtype: torch.dtype | None = None,
    compute_in: torch.dtype | None = None,
) -> float:
    """The displacement length ε^p · max(‖x_b‖, 1) for oracle ``kind``.

    ε = max(eps(params dtype), eps(loss_dtype), eps(compute_in)): rounding in f (or ∇f)
    sets the error floor; ``compute_in`` is the model's precision (:func:`model_dtype`), so
    a float32 block of a bf16 model steps as a bf16 one (a float32 loss cast from bf16
    logits carries bf16 rounding).
    """
    eps = torch.finfo(params[0].dtype).eps
    for d in (loss_dtype, compute_in):
        if d is not None and d.is_floating_point:
            eps = max(eps, torch.finfo(d).eps)
    xnorm = math.sqrt(
        sum(float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2 for p in params)
    )
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


REFERENCE = "at the probe's reference point"


def scalar_loss(loss_fn: Callable[[], torch.Tensor], where: str | None = None) -> torch.Tensor:
    """``loss_fn()`` as a 0-d tensor; TypeError naming what came back if it is not a scalar.

    With ``where`` (e.g. :data:`REFERENCE`), a nan/inf loss is a UsageError naming it."""
    loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    loss = loss.reshape(())
    if where is not None:
        value = float(loss.detach())
        if not math.isfinite(value):
            hint = "" if where == REFERENCE else " (finite at the reference point: try a smaller h)"
            raise UsageError(
                f"loss is {value} {where}{hint}; the probe needs a finite loss "
                "(check the batch, the labels and the weights)"
            )
    return loss


def no_grad_error(detail: str) -> UsageError:
    """The one error every oracle raises for a loss that the block's parameters cannot move."""
    return UsageError(
        f"loss_fn returned a loss without grad with respect to the probed block ({detail}); "
        "compute it from the parameters with gradients enabled (not under torch.no_grad(), "
        "not from .detach() or .item())"
    )


def require_grad(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` if it has an autograd graph, else :func:`no_grad_error`."""
    if not loss.requires_grad:
        raise no_grad_error("requires_grad=False")
    return loss


def block_gradients(
    loss_fn: Callable[[], torch.Tensor], blocks: Mapping[str, Sequence[torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """∇_b f(x) (flat, in each block's compute dtype) for every block from ONE backward pass,
    and the loss's dtype. Frozen parameters get ``requires_grad`` only for the duration."""
    params = [p for ps in blocks.values() for p in ps]
    with grad_enabled_for(params), torch.enable_grad():
        loss = require_grad(scalar_loss(loss_fn, REFERENCE))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    out, i = {}, 0
    for name, ps in blocks.items():
        pieces = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads[i : i + len(ps)], ps)
        ]
        out[name] = flatten(pieces, compute_dtype(ps))
        i += len(ps)
    return out, loss.dtype


def check_step(h: object) -> None:
    """UsageError unless the finite-difference step ``h`` is None or a positive finite float."""
    if h is not None and not (
        isinstance(h, int | float) and not isinstance(h, bool) and 0 < h < math.inf
    ):
        raise UsageError(f"h must be a positive finite float or None, got {h!r}")


class Oracle:
    """Block-restricted curvature oracle, a linear operator over the block's flat parameters.

    Operator interface (see :mod:`smoothlab.estimators.operator`): ``dim``, ``dtype``,
    ``device``, ``kind``, ``matvec(v)`` = H_bb v (``hvp`` is the same), ``quad(v)`` = vᵀH_bb v,
    ``has_matvec`` (False for ``zo``) and, for ``zo``, ``rounding()``. ``num_hvp`` counts
    oracle calls (an HVP, or one second difference for ``zo``). Use as a context manager.
    """

    ZO_CENTER_PAIRS = 4  # jittered reference pairs estimating f(x) for a float32 zo loss
    ZO_JITTER = 1e-2  # their displacement, relative to the second difference's

    def __init__(
        self,
        kind: str,
        loss_fn: Callable[[], torch.Tensor],
        params: Sequence[torch.Tensor],
        *,
        h: float | None = None,
        root: nn.Module | None = None,
        gradient: tuple[torch.Tensor, torch.dtype] | None = None,
        outside: Collection[int] | None = None,
    ) -> None:
        """``gradient``: ∇_b f(x) (flat) and the loss's dtype, when the caller already has them
        (``probe`` computes one joint backward for all blocks of an ``fd`` probe).
        ``outside``: ids of the parameters the loss reads outside their modules' forwards
        (:func:`smoothlab.perturb.outside_reads`, which runs once otherwise); those are
        shifted by swapping their data, and a block holding one leaves the fast path."""
        if kind not in HVPS:
            raise UsageError(f"unknown hvp oracle {kind!r}; accepted: {', '.join(HVPS)}")
        check_step(h)
        self.kind = kind
        self.has_matvec = kind != "zo"
        self.loss_fn = loss_fn
        self.params = list(params)
        self.h = h
        self.root = root
        self._outside = None if outside is None else set(outside)
        self.dtype = compute_dtype(self.params)
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.num_hvp = 0
        self._stack: contextlib.ExitStack | None = None
        self._g0: torch.Tensor | None = None
        self._f_ref: float | None = None  # f(x) as computed (checked finite)
        self._f0: float | None = None  # the zo centre estimate of f(x)
        self._f0_var = 0.0  # its variance (rounding shared by every zo sample)
        self._f_noise = 0.0  # rounding std of one evaluation of f
        self._inv_s2: list[float] = []
        self._grad_confirmed = False
        self._ulps: list[float] = []  # |f(x+sv) + f(x−sv) − 2f̂₀| in units of the loss's ulp
        self._ulp = 0.0
        self._graph: tuple[torch.Tensor, ...] | None = None
        self._shift_buf: torch.Tensor | None = None  # x + s·v for the fast fd path
        self._owner_map: dict = {}
        self._row_owners: set[nn.Module] = set()  # embeddings given row leaves (fd fast path)
        self._dense_idx: list[int] = []  # parameters shadowed densely (fd fast path)
        self._quad_buf: torch.Tensor | None = None
        self._step: float | None = None  # set once the loss's dtype is known
        self._loss_dtype: torch.dtype | None = None
        if gradient is not None:
            self._g0, self._loss_dtype = gradient[0].to(self.dtype), gradient[1]
        self._model_dtype = model_dtype(root)
        half = self.params[0].dtype if self.params[0].dtype in _HALF else None
        if half is None and self._model_dtype in _HALF:
            half = self._model_dtype
        if kind != "exact" and half is not None:
            where = (
                f"a {half} block"
                if half == self.params[0].dtype
                else f"a {self.params[0].dtype} block of a {half} model"
            )
            warnings.warn(
                f"hvp={kind!r} on {where}: finite differences in half "
                f"precision (eps={torch.finfo(half).eps:.1e}) are unreliable; "
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
        self._shift_buf = self._quad_buf = None
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
                self.reference_value()  # one forward to learn the loss's dtype
            self._step = default_step(self.kind, self.params, self._loss_dtype, self._model_dtype)
        return self._step / max(float(v.norm()), 1e-30)

    def _loss(self, where: str) -> torch.Tensor:
        loss = scalar_loss(self.loss_fn, where)
        self._loss_dtype = loss.dtype
        return loss

    def _grad(self, where: str = REFERENCE) -> torch.Tensor:
        with torch.enable_grad():
            loss = require_grad(self._loss(where))
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return flatten(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)],
            self.dtype,
        )

    def _swap(self) -> set[int]:
        """Indices of the block's parameters the loss reads outside their owning modules'
        forwards (found once): shifted by a ``.data`` swap, never on the fly."""
        if self.root is None:
            return set()
        if self._outside is None:
            found = outside_reads(self.root, self.params, self.loss_fn)
            self._outside = {id(self.params[i]) for i in found}
        return {i for i, p in enumerate(self.params) if id(p) in self._outside}

    def shifted(self, v: torch.Tensor, s: float) -> contextlib.AbstractContextManager:
        """A context in which the loss sees the block at x + s·v (on the fly where the model
        allows, by swaps for the parameters of :meth:`_swap`)."""
        return shifted(self.params, unflatten(v, self.params), s, self.root, swap=self._swap())

    def _grad_at(self, v: torch.Tensor, s: float) -> torch.Tensor:
        with self.shifted(v, s):
            return self._grad(f"at the shifted point x + {s:.3g}·v")

    def _value_at(self, v: torch.Tensor, s: float) -> float:
        with torch.no_grad(), self.shifted(v, s):
            return float(self._loss(f"at the shifted point x + {s:.3g}·v").double())

    def reference_value(self) -> float:
        """f(x), computed once (a nan/inf loss is a UsageError naming it)."""
        if self._f_ref is None:
            with torch.no_grad():
                self._f_ref = float(self._loss(REFERENCE).double())
        return self._f_ref

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
            return math.sqrt(
                sum(
                    float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64)) ** 2
                    for g in self._graph
                )
            )
        return math.nan

    # -- fast finite differences ---------------------------------------------------------
    def _fast(self) -> bool:
        """Whether the leaf-shadow path applies: a module tree is known and every parameter
        has the compute dtype (gradients accumulate in place into the result), and the loss
        reads none outside its owning module's forward (:meth:`_swap`)."""
        return (
            self.root is not None
            and all(p.dtype == self.dtype for p in self.params)
            and not self._swap()
        )

    def _accumulate_grad_at(
        self, v: torch.Tensor, s: float, out: torch.Tensor, weight: float
    ) -> None:
        """out += weight · ∇_b f(x + s·v) (:meth:`_accumulate_local`); under
        :func:`gradient_reduction`, the gradient is taken into a zeroed buffer, reduced,
        then added."""
        if not _REDUCERS:
            self._accumulate_local(v, s, out, weight)
            return
        part = torch.zeros_like(out)
        self._accumulate_local(v, s, part, weight)
        _REDUCERS[-1](part)
        out.add_(part)

    def _accumulate_local(
        self, v: torch.Tensor, s: float, out: torch.Tensor, weight: float
    ) -> None:
        """out += weight · ∇_b f(x + s·v), with no block-sized temporary.

        x + s·v is written, one pass, into a flat buffer reused across calls; its
        per-parameter views are fresh autograd leaves that the owning modules see in place of
        their parameters (instance ``__dict__`` shadowing, as in :mod:`smoothlab.perturb`,
        for the whole forward); each leaf's ``.grad`` is preset to the matching view of
        ``out``, so the backward accumulates there in place (no flatten, no copy, and no
        division afterwards: ``weight`` seeds the backward). A plain embedding reads only its
        input's rows, so its output becomes a leaf W[ids] + s·v[ids] whose gradient is added
        into ``out`` at those rows: the vocabulary is neither shifted nor given a dense
        gradient. Stored parameters are never written."""
        if self._shift_buf is None:
            self._shift_buf = torch.empty(self.dim, dtype=self.dtype, device=self.device)
            self._owner_map = owners(self.root, self.params)
            # rows-only owners: stock embeddings whose gradient is a plain sum over rows
            self._row_owners = {
                m
                for m in self._owner_map
                if row_wise(m) and not m.scale_grad_by_freq and not m.sparse
            }
            self._dense_idx = sorted(
                {
                    i
                    for m, names in self._owner_map.items()
                    if m not in self._row_owners
                    for _, i in names
                }
            )
        shadows = unflatten(self._shift_buf, self.params)
        dirs, grads = unflatten(v, self.params), unflatten(out, self.params)
        leaves: dict[int, torch.Tensor] = {}
        for i in self._dense_idx:
            leaf = torch.add(self.params[i].detach(), dirs[i], alpha=s, out=shadows[i])
            leaves[i] = leaf = leaf.detach().requires_grad_()
            leaf.grad = grads[i]
        rows: list[tuple[nn.Module, int, torch.Tensor, torch.Tensor]] = []

        def rows_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
            ids = args[0] if args else kwargs["input"]
            i = self._owner_map[module][0][1]
            w = self.params[i].detach()
            leaf = torch.add(F.embedding(ids, w), F.embedding(ids, dirs[i]), alpha=s)
            rows.append((module, i, ids, leaf.requires_grad_()))
            return leaf

        handles = [m.register_forward_hook(rows_hook, with_kwargs=True) for m in self._row_owners]
        try:
            for module, names in self._owner_map.items():
                if module not in self._row_owners:
                    for name, i in names:
                        module.__dict__[name] = leaves[i]
            with torch.enable_grad():
                loss = require_grad(self._loss(f"at the shifted point x + {s:.3g}·v"))
                seed = torch.full_like(loss, weight)
                inputs = list(leaves.values()) + [r[3] for r in rows]
                torch.autograd.backward(loss, grad_tensors=seed, inputs=inputs)
        finally:
            for h in handles:
                h.remove()
            for module, names in self._owner_map.items():
                for name, _ in names:
                    module.__dict__.pop(name, None)
        for i, leaf in leaves.items():
            if leaf.grad is not None and leaf.grad.data_ptr() != grads[i].data_ptr():
                grads[i].copy_(leaf.grad)  # the engine replaced instead of accumulating
        for module, i, ids, leaf in rows:
            if leaf.grad is None:
                continue
            flat_ids, g = ids.reshape(-1), leaf.grad.reshape(-1, leaf.shape[-1])
            if module.padding_idx is not None:  # the padding row gets no gradient
                keep = flat_ids != module.padding_idx
                flat_ids, g = flat_ids[keep], g[keep]
            grads[i].index_add_(0, flat_ids, g.to(grads[i].dtype))

    def _fd_fast(self, v: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """``fd`` / ``fd-central`` on the leaf-shadow path (into ``out`` when given). The
        difference quotient's 1/h rides in the backward's seed (no pass to divide after)
        when the loss is float32/64; a half-precision seed would round it (bf16: 0.2%)."""
        central = self.kind != "fd"
        g0 = None if central else self.gradient()  # also tells step_for the loss's dtype
        if central:
            self.reference_value()
        s = self.step_for(v)
        c = (0.5 if central else 1.0) / s
        w = c if self._loss_dtype in (torch.float32, torch.float64) else 1.0
        if g0 is None:
            res = torch.zeros_like(v) if out is None else out.zero_()
            self._accumulate_grad_at(v, s, res, w)
            self._accumulate_grad_at(v, -s, res, -w)
        else:
            res = torch.mul(g0, -w) if out is None else torch.mul(g0, -w, out=out)
            self._accumulate_grad_at(v, s, res, w)
        return res if w == c else res.mul_(c)

    # -- oracle calls ----------------------------------------------------------------
    matvec_out = True  # hvp/matvec accept out= (a buffer the caller no longer needs)

    def hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H_bb v for a flat vector v (not available for ``zo``); written into ``out`` (a
        flat buffer of the compute dtype, not aliasing v) when given."""
        if self.kind == "zo":
            raise UsageError(
                "hvp='zo' gives quadratic forms vᵀHv only; use norm='trace' or 'frobenius'"
            )
        self.num_hvp += 1
        if self.kind == "exact":
            return self._exact_hvp(v, out)
        if self._fast():
            return self._fd_fast(v, out)
        if self.kind == "fd":
            g0 = self.gradient()  # also tells step_for the loss's dtype
            s = self.step_for(v)
            return (
                self._grad_at(v, s).sub_(g0).div_(s)
            )  # in place: block-sized temporaries are costly
        self.reference_value()
        s = self.step_for(v)
        return self._grad_at(v, s).sub_(self._grad_at(v, -s)).div_(2 * s)

    matvec = hvp

    def _exact_hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._graph is None:
            with torch.enable_grad():
                loss = require_grad(self._loss(REFERENCE))
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self._graph = tuple(
                torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)
            )
        pieces = unflatten(v, self.params)
        with torch.enable_grad():
            needs = [g.requires_grad for g in self._graph]
            if not any(needs):
                return torch.zeros_like(v) if out is None else out.zero_()
            hv = torch.autograd.grad(
                [g for g, n in zip(self._graph, needs) if n],
                self.params,
                grad_outputs=[w.to(g.dtype) for w, g, n in zip(pieces, self._graph, needs) if n],
                retain_graph=True,
                allow_unused=True,
            )
        return flatten(
            [torch.zeros_like(p) if x is None else x for x, p in zip(hv, self.params)],
            self.dtype,
            out,
        )

    def quad(self, v: torch.Tensor) -> float:
        """vᵀ H_bb v: from an HVP, or (``zo``) from a second difference of f."""
        if self.kind != "zo":
            if self._quad_buf is None:  # H v is consumed here: reuse one buffer
                self._quad_buf = torch.empty(self.dim, dtype=self.dtype, device=self.device)
            return dot64(v, self.hvp(v, out=self._quad_buf))
        self.num_hvp += 1
        s = self.step_for(v)  # also evaluates f(x) once
        if self._f0 is None:
            self._estimate_center(s * float(v.norm()))
        fp, fm = self._value_at(v, s), self._value_at(v, -s)
        if fp == fm == self._f_ref and not self._grad_confirmed:
            self._confirm_grad(fp)
        self._inv_s2.append(1.0 / (s * s))
        numer = (fp - self._f0) + (fm - self._f0)
        self._ulps.append(abs(numer) / self._ulp)
        return numer / (s * s)

    def _confirm_grad(self, value: float) -> None:
        """f(x ± h v) = f(x) bit for bit: a loss without grad, or curvature below rounding.
        One forward with autograd on tells them apart (only in this rare case)."""
        with grad_enabled_for(self.params), torch.enable_grad():
            if not self._loss(REFERENCE).requires_grad:
                raise no_grad_error(
                    f"f(x) = f(x ± h·v) = {value!r} bit for bit and requires_grad=False"
                )
        self._grad_confirmed = True

    def _estimate_center(self, displacement: float) -> None:
        """f(x) for second differences. A float64 loss: f(x) itself. Coarser: the mean of K
        pairs (f(x + t w_k) + f(x − t w_k))/2 with t‖w_k‖ = 10⁻²·displacement, whose rounding
        errors are independent; their spread gives the rounding noise of one evaluation."""
        f_ref = self.reference_value()
        eps = (
            torch.finfo(self._loss_dtype).eps
            if self._loss_dtype and self._loss_dtype.is_floating_point
            else 0.0
        )
        self._ulp = max(eps * 2.0 ** math.floor(math.log2(max(abs(f_ref), 1e-30))), 1e-300)
        if eps < 1e-10 or self.ZO_CENTER_PAIRS < 2:
            self._f0 = f_ref
            return
        gen = torch.Generator(device=self.device).manual_seed(0x5EED)
        pairs = []
        for _ in range(self.ZO_CENTER_PAIRS):
            w = random_vector("rademacher", self.dim, gen, self.dtype, self.device)
            t = self.ZO_JITTER * displacement / math.sqrt(self.dim)
            pairs.append(0.5 * (self._value_at(w, t) + self._value_at(w, -t)))
        k = len(pairs)
        mean = sum(pairs) / k
        var = sum((p - mean) ** 2 for p in pairs) / (k - 1)
        self._f0, self._f0_var, self._f_noise = mean, var / k, math.sqrt(2 * var)

    def rounding(self) -> tuple[float, float, float]:
        """(rounding std of one ``zo`` sample, std of the error shared by all samples), in the
        units of vᵀHv: √2·σ_f·mean(1/s²) and 2·√Var(f̂₀)·mean(1/s²); and the median size of
        the second difference's numerator in ulps of f (a few ulps: quantised, biased)."""
        if not self._inv_s2:
            return 0.0, 0.0, math.inf
        inv = sum(self._inv_s2) / len(self._inv_s2)
        ulps = sorted(self._ulps)[len(self._ulps) // 2]
        return math.sqrt(2) * self._f_noise * inv, 2 * math.sqrt(self._f0_var) * inv, ulps
