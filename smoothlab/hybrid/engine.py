r"""The hybrid SGD engine (the paper's Algorithm 1) and its baselines.

One step on a minibatch ξ, with base weights x (zeroth order) and PEFT weights y (first order):

    ĝ_x = (1/q) Σ_{i=1..q} g_i z_i,   z_i regenerated from a seed, never stored,
        g_i = [f(x + μz_i, y; ξ) − f(x − μz_i, y; ξ)] / 2μ          (two-sided), or
        g_i = [f(x + μz_i, y; ξ) − f(x, y; ξ)] / μ                   (one-sided; f(x) shared)
    x ← x − η_x ĝ_x
    y ← y − η_y ∇_y f(x, y; ξ)

Both learning rates are parameter groups of one optimizer (:class:`TwoRateSGD`), so LR
schedulers act on each group. The perturbed forwards use :func:`smoothlab.shifted` (W + μz
applied on the fly inside each layer), so after the step x has moved by exactly −η_x ĝ_x:
no +μ/−2μ/+μ drift, in bf16 too; the memory is that of inference (+ one layer's z), for any q.
The base weights keep ``requires_grad=False``: backprop stores no base gradients.

z comes from a perturbation source (``z=``, :data:`smoothlab.perturb.SOURCES`; i.i.d.
entries of unit variance and fourth moment κ, so E ĝ = ∇f and E‖ĝ‖² = ((d + κ − 2)/q + 1)‖∇f‖²).
Per step and parameter, z is fetched once per use: fused into the layer's shadow
``W + μz`` (one pass, into reusable scratch memory) in each perturbed forward, and into the
update ``x ← x − η Σ_i c_i z_i`` (one in-place pass per term). With the default ``table``
source no z is ever generated: it is a slice of the run's noise table.

``fo_at_perturbed=True`` takes ∇_y f at (x + μz_1, y) from the first perturbed forward
instead of a separate forward at (x, y): one forward fewer per two-sided step, at the price
of a gradient evaluated a distance μ‖z‖ away (a bias of order μ‖∇²_yx f‖‖z‖). A one-sided
step evaluates f(x, y) anyway, so there it saves nothing and only adds the bias.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from smoothlab.errors import UsageError
from smoothlab.perturb import (
    DEFAULT_SOURCE,
    Sampler,
    Scratch,
    SeededDirection,
    Source,
    get_source,
    outside_reads,
    owners,
    param_seed,
    shifted,
    table_size,
)

from .faults import Diverged

LossFn = Callable[[], torch.Tensor]
Reduce = Callable[[list[float]], list[float]]


def check_nonneg(what: str, v: object) -> None:
    """UsageError unless ``v`` is a finite number >= 0, not a bool (``what`` names it: a
    rate, the weight decay)."""
    if not (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)):
        raise UsageError(f"{what} must be a finite float >= 0, got {v!r}")


def check_rate(group: object, lr: object) -> None:
    """UsageError unless ``lr`` is a finite number >= 0 (the rate of ``group``)."""
    check_nonneg(f"learning rate of group {group!r}", lr)


class TwoRateSGD(torch.optim.Optimizer):
    """Plain SGD whose parameter groups are either first-order or zeroth-order.

    First-order groups: p ← p − lr·(∇p + wd·p) from ``p.grad``. Zeroth-order groups
    (``zo=True``): p ← (1 − lr·wd)·p − lr·Σ_i c_i z_i(p) for the step's coefficients
    ``c_i = g_i/q`` and directions regenerated from their seeds, one parameter and one z at
    a time.
    """

    def __init__(self, groups: list[dict], weight_decay: float = 0.0) -> None:
        for g in groups:
            check_rate(g.get("name"), g.get("lr"))
        check_nonneg("weight_decay", weight_decay)  # nan/inf made every weight nan/inf
        super().__init__(groups, {"lr": 0.0, "zo": False, "weight_decay": weight_decay, "name": ""})

    @torch.no_grad()
    def step(self, closure: None = None, zo_terms: Sequence[tuple[int, float]] = ()) -> None:  # type: ignore[override]
        """Apply one update. ``zo_terms``: (seed, coefficient) pairs of the SPSA estimate; z of
        each seed comes from the group's ``sampler`` (default: the exact Gaussian). A
        coefficient beyond the weights' dtype (a rate far too large) raises
        :class:`~smoothlab.hybrid.faults.Diverged` before any weight changes."""
        self._check_coefficients(zo_terms)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            if group["zo"]:
                if not zo_terms:
                    continue
                sampler = group.get("sampler") or _gaussian_sampler()
                zo_update(sampler, group["params"], zo_terms, lr, wd, index=group["index"])
            else:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    d = p.grad if not wd else p.grad.add(p, alpha=wd)
                    p.add_(d, alpha=-lr)

    def _check_coefficients(self, zo_terms: Sequence[tuple[int, float]]) -> None:
        """Diverged if a scalar this update hands torch overflows its group's dtype (torch
        would refuse it half-way through the update, with the weights partly written)."""
        for group in self.param_groups:
            if not group["params"]:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            if group["zo"]:
                scalars = [1 - lr * wd] + [lr * c for _, c in zo_terms]
            else:
                scalars = [lr, wd]
            top = _dtype_max(group["params"])
            bad = [c for c in scalars if math.isfinite(c) and abs(c) > top]
            if bad:
                raise Diverged(
                    f"the {group['name']} update's coefficient {bad[0]:.3g} overflows "
                    f"{group['params'][0].dtype} (rate {lr:g}, weight decay {wd:g}); lower "
                    "the learning rates (then rerun with --restart or another --out)"
                )


def _dtype_max(params: Sequence[torch.Tensor]) -> float:
    """The largest finite value every one of ``params`` can hold."""
    return min(torch.finfo(p.dtype).max for p in params)


_HALF = (torch.float16, torch.bfloat16)
HALF_LOST_WARN = 0.1
"""Fraction of half-precision ZO entries whose perturbation or update rounds away above
which the engine warns (:meth:`HybridEngine._check_half_precision`)."""


def _suggest_mu(mu: float, lost: float) -> str:
    """A mu ten times larger per decade of loss (a rough pointer, printed as e.g. 1e-03)."""
    return f"{mu * (100 if lost > 0.5 else 10):.0e}"


def _gaussian_sampler() -> Sampler:
    return get_source("gaussian").sampler()


@torch.no_grad()
def zo_update(
    sampler: Sampler,
    params: Sequence[torch.Tensor],
    terms: Sequence[tuple[int, float]],
    lr: float,
    wd: float = 0.0,
    *,
    index: dict[int, int] | None = None,
) -> None:
    """x ← (1 − lr·wd)·x − lr·Σ_i c_i z_i, z_i regenerated from ``sampler(seed_i)``.

    The one ZO update: training (:class:`TwoRateSGD`) and the replay of a seed checkpoint
    (:func:`smoothlab.hybrid.seedlog.replay` with :func:`zo_updater`) both call it, so a replayed
    trajectory is bit-identical by construction.
    """
    indices = [k if index is None else index[id(p)] for k, p in enumerate(params)]
    if wd:
        for p in params:
            p.mul_(1 - lr * wd)
    for seed, coef in terms:  # each entry sees the same ops in the same order as term by term
        d = sampler(seed)
        many = getattr(d, "update_many", None)
        if many is not None:  # one batched call (the table's slices are views)
            many(indices, params, -lr * coef)
            continue
        for i, p in zip(indices, params):
            d.update_(i, p, -lr * coef)


class _DeviceDirection:
    """z of one seed for parameters spread over devices: each parameter's z, shift and
    update come from the sampler of that parameter's own device (nothing crosses devices)."""

    def __init__(self, by_device: dict[torch.device, SeededDirection]) -> None:
        self.by_device = by_device
        self.cheap_rows = all(getattr(d, "cheap_rows", False) for d in by_device.values())

    def _on(self, p: torch.Tensor) -> SeededDirection:
        return self.by_device[p.device]

    def __call__(self, index: int, p: torch.Tensor) -> torch.Tensor:
        return self._on(p)(index, p)

    def shift(
        self, index: int, w: torch.Tensor, scale: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._on(w).shift(index, w, scale, out)

    def rows(self, index: int, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self._on(w).rows(index, w, ids)

    def update_(self, index: int, p: torch.Tensor, alpha: float) -> None:
        self._on(p).update_(index, p, alpha)


class DeviceSampler:
    """A source bound to a run whose ZO parameters live on several devices (a model placed
    with a device map): one :class:`~smoothlab.perturb.Sampler` per device, all built from
    the run's seed and one table size, sharing one scratch.

    Parameter i's z therefore depends only on (run seed, seed, i, the device *type*): the
    ``table`` source builds the same table on every device of one type (one generator
    algorithm per type), so a model over cuda:0..cuda:7 perturbs exactly like one on
    cuda:0; CPU and CUDA generators differ (``hash`` is the placement-independent source).
    """

    def __init__(
        self,
        source: Source,
        run_seed: int,
        params: Sequence[torch.Tensor],
        table: int | None = None,
    ) -> None:
        self.scratch = Scratch()
        largest = _largest(params)
        devices = dict.fromkeys(p.device for p in params)
        self.samplers = {d: source.sampler(run_seed, largest, self.scratch, table) for d in devices}
        self.table_size = next(iter(self.samplers.values())).table_size

    def __call__(self, seed: int) -> _DeviceDirection:
        return _DeviceDirection({d: s(seed) for d, s in self.samplers.items()})


def make_sampler(
    source: Source, run_seed: int, params: Sequence[torch.Tensor], table: int | None = None
) -> Sampler | DeviceSampler:
    """The sampler of a run over ``params`` (``table``: a saved run's noise-table entries,
    else sized from ``params``): a plain one when they share a device, else a
    :class:`DeviceSampler`. Parameters on the ``meta`` device (offloaded by a device map)
    are refused: their weights are not in memory, so they cannot be perturbed in place."""
    devices = {p.device for p in params}
    if any(d.type == "meta" for d in devices):
        raise UsageError(
            "some zeroth-order parameters are on the 'meta' device (offloaded to disk or CPU by "
            "the device map); ZO updates need every weight in memory: give the map more memory "
            "per device (max_memory) or use fewer/larger devices"
        )
    if len(devices) <= 1:
        return source.sampler(run_seed, _largest(params), table=table)
    return DeviceSampler(source, run_seed, params, table)


def _largest(params: Sequence[torch.Tensor]) -> int:
    """Entries of the largest of ``params`` (0 for none): what sizes the noise table."""
    return max((p.numel() for p in params), default=0)


def table_of(state: dict, params: Sequence[torch.Tensor]) -> int:
    """The noise-table entries of a saved engine ``state`` (:meth:`HybridEngine.state_dict`)
    whose ZO block is ``params``: its record, or for a state saved before the record, the
    uncapped size it ran with (:func:`~smoothlab.perturb.table_size`, ``capped=False``)."""
    if "table" in state:
        return int(state["table"])
    return table_size(_largest(params), capped=False)


def zo_updater(
    params: Sequence[torch.Tensor],
    *,
    seed: int,
    z: str = DEFAULT_SOURCE,
    table: int | None = None,
) -> Callable[[Sequence[torch.Tensor], Sequence[tuple[int, float]], float, float], None]:
    """``update(params, terms, lr, wd)`` for the run with ``seed``, source ``z`` and noise
    ``table`` entries (default: sized from ``params``) whose ZO block is ``params`` (the
    sampler a :class:`HybridEngine` of that run builds, per device when ``params`` are
    spread over several)."""
    sampler = make_sampler(get_source(z), seed, list(params), table)

    def update(
        ps: Sequence[torch.Tensor], terms: Sequence[tuple[int, float]], lr: float, wd: float
    ) -> None:
        zo_update(sampler, ps, terms, lr, wd)

    return update


@dataclass(frozen=True)
class StepResult:
    """What one step measured: the loss at (x, y) (or its ZO stand-in), the mean projected
    gradient (1/q) Σ g_i (``nan`` without a ZO block), and the forward passes it took."""

    loss: float
    proj_grad: float
    forwards: int
    terms: tuple[tuple[int, float], ...] = ()


def _check_engine_args(
    zo_params: Sequence[nn.Parameter],
    fo_params: Sequence[nn.Parameter],
    mu: float,
    q: int,
    lr_zo: float,
    lr_fo: float,
) -> None:
    """Validate :class:`HybridEngine`'s arguments (UsageError naming the bad value)."""
    if not zo_params and not fo_params:
        raise UsageError(
            "nothing to train: both the zeroth-order and first-order parameter lists are empty"
        )
    if not (isinstance(mu, int | float) and mu > 0 and math.isfinite(mu)):
        raise UsageError(f"mu must be a positive float, got {mu!r}")
    if zo_params and mu > _dtype_max(zo_params):
        raise UsageError(f"mu={mu!r} overflows the {zo_params[0].dtype} weights it shifts")
    if not isinstance(q, int) or isinstance(q, bool) or q < 1:
        raise UsageError(f"q must be an integer >= 1, got {q!r}")
    for name, group, lr in (("lr_zo", "base", lr_zo), ("lr_fo", "peft", lr_fo)):
        # checked even when the group is absent: a bad rate is a caller error either way
        check_nonneg(f"{name} (learning rate of group {group!r})", lr)
    ids = {id(p) for p in zo_params}
    if any(id(p) in ids for p in fo_params):
        raise UsageError("a parameter is in both the zeroth-order and the first-order set")


class HybridEngine:
    """Algorithm 1 on a model: ``engine.step(loss_fn)`` once per minibatch.

    ``zo_params`` (x) are updated from SPSA estimates, ``fo_params`` (y) from gradients;
    either may be empty (``zo-ft``: no y; ``fo-*``: no x). ``seed`` fixes every z: step t's
    perturbation i uses seed ``param_seed(seed, t·q + i)``, so a resumed run replays the same z.
    ``z`` names the perturbation source (``smoothlab.perturb.SOURCES``); the ``table``
    source's table is rebuilt from ``seed`` and the size of the largest x, capped
    (:func:`~smoothlab.perturb.table_size`); a resumed run rebuilds the size it saved.
    """

    def __init__(
        self,
        model: nn.Module,
        zo_params: Sequence[nn.Parameter],
        fo_params: Sequence[nn.Parameter],
        *,
        lr_zo: float,
        lr_fo: float,
        mu: float = 1e-3,
        q: int = 1,
        one_sided: bool = False,
        fo_at_perturbed: bool = False,
        weight_decay: float = 0.0,
        seed: int = 0,
        z: str = DEFAULT_SOURCE,
    ) -> None:
        self.source = get_source(z)  # UsageError naming the accepted sources
        _check_engine_args(zo_params, fo_params, mu, q, lr_zo, lr_fo)
        self.model = model
        self.swap: set[int] | None = None  # ZO weights read outside their modules (first step)
        self._owners: dict | None = None  # the ZO weights' modules (:meth:`_owned`)
        self.zo_params = list(zo_params)
        self.fo_params = list(fo_params)
        self.mu, self.q, self.one_sided = float(mu), q, one_sided
        self.fo_at_perturbed = fo_at_perturbed and bool(zo_params) and bool(fo_params)
        self.seed = seed
        self.t = 0
        self._half_checked = False  # the first step's half-precision check (one warning)
        self.sampler = make_sampler(self.source, seed, self.zo_params)
        for p in self.zo_params:
            p.requires_grad_(False)
        for p in self.fo_params:
            p.requires_grad_(True)
        self.optimizer = TwoRateSGD(self._param_groups(lr_zo, lr_fo), weight_decay=weight_decay)

    def _param_groups(self, lr_zo: float, lr_fo: float) -> list[dict]:
        """TwoRateSGD groups: ``base`` (ZO, with its sampler and parameter index), ``peft``."""
        groups = []
        if self.zo_params:
            groups.append(
                {
                    "name": "base",
                    "params": self.zo_params,
                    "lr": lr_zo,
                    "zo": True,
                    "index": {id(p): i for i, p in enumerate(self.zo_params)},
                    "sampler": self.sampler,
                }
            )
        if self.fo_params:
            groups.append({"name": "peft", "params": self.fo_params, "lr": lr_fo, "zo": False})
        return groups

    # -- learning rates ------------------------------------------------------------------
    def lr(self, name: str) -> float:
        """Current learning rate of group ``base`` or ``peft`` (0 when absent)."""
        for g in self.optimizer.param_groups:
            if g["name"] == name:
                return float(g["lr"])
        return 0.0

    def set_lr(self, name: str, value: float) -> None:
        """Set the rate of group ``base`` or ``peft`` (a no-op when the group is absent)."""
        check_rate(name, value)
        for g in self.optimizer.param_groups:
            if g["name"] == name:
                g["lr"] = float(value)

    def perturbation_seed(self, t: int, i: int) -> int:
        """Seed of perturbation i at step t."""
        return param_seed(self.seed, t * self.q + i)

    def direction(self, seed: int):
        """z(i, p) of a perturbation seed (``engine.direction(engine.perturbation_seed(t, k))``)."""
        return self.sampler(seed)

    def _shifted(self, seed: int, scale: float, backward_inside: bool = False):
        return shifted(
            self.zo_params,
            self.sampler(seed),
            scale,
            self.model,
            scratch=self.sampler.scratch,
            backward_inside=backward_inside,
            swap=self.swap or (),  # None before the first step found them
            owned=self._owned(),
        )

    def _owned(self) -> dict | None:
        """:func:`smoothlab.perturb.owners` of the model and the ZO weights, found once: the
        model's modules and weights do not change within a run."""
        if self.model is None:
            return None
        if self._owners is None:
            self._owners = owners(self.model, self.zo_params)
        return self._owners

    def _find_outside_reads(self, loss_fn: LossFn) -> None:
        """Once, before the first perturbed forward: the ZO weights the loss reads outside
        their modules' forwards (:func:`smoothlab.perturb.outside_reads`; one extra forward,
        random state restored). Those are shifted by exact ``.data`` swaps, one copy each;
        on the fly they would be seen unshifted."""
        if self.swap is not None:
            return
        self.swap = set()
        if self.model is not None and self.zo_params:
            self.swap = outside_reads(self.model, self.zo_params, loss_fn)
        if self.swap:
            names = {id(p): n for n, p in self.model.named_parameters()}
            first = names.get(id(self.zo_params[min(self.swap)]), f"#{min(self.swap)}")
            warnings.warn(
                f"{len(self.swap)} zeroth-order weight(s) (e.g. {first!r}) are read outside "
                "their module's forward; they are perturbed by swapping in a shifted copy "
                "(exact, one copy of each in memory)",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- the step ------------------------------------------------------------------------
    def _fo_loss(self, loss_fn: LossFn, shift: tuple[int, float] | None) -> torch.Tensor:
        # at a shift the backward ends inside it: recomputed (checkpointed) layers see the
        # shifted weights, and the shadows can live in reused scratch
        at = contextlib.nullcontext() if shift is None else self._shifted(*shift, True)
        with torch.enable_grad(), at:
            loss = loss_fn()
            grads = torch.autograd.grad(loss, self.fo_params, allow_unused=True)
        for p, g in zip(self.fo_params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        return loss.detach()

    def _value(self, loss_fn: LossFn, seed: int | None, scale: float) -> float:
        with torch.no_grad():
            if seed is None:
                return float(loss_fn())
            with self._shifted(seed, scale):
                return float(loss_fn())

    def _local_values(
        self, loss_fn: LossFn, between: Callable[[], None] | None = None
    ) -> tuple[list[float], int]:
        """Every loss the step needs, in a fixed order, and the forwards taken: [f(x) if
        the gradient forward is at x] + [f(x) if one-sided needs it] + per perturbation i
        [f(x + μz_i), f(x − μz_i) unless one-sided]. The PEFT gradient is left in ``.grad``.
        ``between`` is called after each forward (nothing is changed until the update)."""
        vals: list[float] = []

        def add(value: float) -> None:
            vals.append(value)
            if between is not None:
                between()

        if self.fo_params and not self.fo_at_perturbed:
            add(float(self._fo_loss(loss_fn, None)))
        if self.zo_params:
            if self.one_sided and not vals:  # f(x) unless the gradient forward gave it
                add(self._value(loss_fn, None, 0.0))
            for i in range(self.q):
                s = self.perturbation_seed(self.t, i)
                if i == 0 and self.fo_at_perturbed:
                    add(float(self._fo_loss(loss_fn, (s, self.mu))))
                else:
                    add(self._value(loss_fn, s, self.mu))
                if not self.one_sided:
                    add(self._value(loss_fn, s, -self.mu))
        return vals, len(vals)

    def step(
        self,
        loss_fn: LossFn,
        *,
        reduce: Reduce | None = None,
        zo_rate: Callable[[list[tuple[int, float]]], float] | None = None,
        between: Callable[[], None] | None = None,
    ) -> StepResult:
        """One update of x (SPSA) and y (gradient) on the batch behind ``loss_fn``.

        ``reduce`` (data parallelism): maps this rank's list of the step's 2q(+1) losses to
        the global-batch losses in ONE collective, e.g. ``smoothlab.hybrid.distributed.weighted_sum``;
        every rank then computes the same g_i and applies the same update. Without it the
        losses are used as computed (one process). ``zo_rate``: called with the step's
        (seed, g_i/q) terms before the update; its value becomes the ``base`` rate from this
        update on (e.g. :meth:`smoothlab.budget.WalkBudget.step`). ``between``: called
        after each of the step's forwards, before anything is changed; an exception it
        raises abandons the step (a trainer's pending interrupt, so that a step of many
        forwards, large q, stops within one forward)."""
        self._find_outside_reads(loss_fn)
        vals, forwards = self._local_values(loss_fn, between)
        if reduce is not None:
            vals = reduce(vals)
        it = iter(vals)
        at_x = bool(self.fo_params) and not self.fo_at_perturbed
        loss_at_x = next(it) if at_x else math.nan
        terms: list[tuple[int, float]] = []
        grads: list[float] = []
        if self.zo_params:
            f0 = loss_at_x
            if self.one_sided and not at_x:
                f0 = next(it)
            for i in range(self.q):
                s = self.perturbation_seed(self.t, i)
                fp = next(it)
                if self.one_sided:
                    g = (fp - f0) / self.mu
                else:
                    fm = next(it)
                    g = (fp - fm) / (2 * self.mu)
                    if not math.isfinite(loss_at_x):
                        loss_at_x = 0.5 * (fp + fm)  # f(x) + O(μ²): the logged loss
                if not math.isfinite(loss_at_x):
                    loss_at_x = f0 if math.isfinite(f0) else fp
                grads.append(g)
                terms.append((s, g / self.q))
        if zo_rate is not None and terms:
            self.set_lr("base", zo_rate(terms))
        if not self._half_checked and terms:
            self._half_checked = True
            self._check_half_precision(terms)
        self.optimizer.step(zo_terms=terms)
        for p in self.fo_params:
            p.grad = None
        self.t += 1
        proj = sum(grads) / len(grads) if grads else math.nan
        return StepResult(loss=loss_at_x, proj_grad=proj, forwards=forwards, terms=tuple(terms))

    @torch.no_grad()
    def _check_half_precision(self, terms: Sequence[tuple[int, float]]) -> None:
        """Once, at the first step this engine takes: in half precision, measure on the step's
        own z how many entries of the ZO weights (a) the perturbation μz_1 and (b) the
        update −η Σ c_i z_i leave unchanged (below half a unit in the last place of the
        weight; bf16 keeps 8 significant bits, float16 11), and warn, naming the fix, when
        either loses more than :data:`HALF_LOST_WARN` of them: (a) makes the SPSA difference
        rounding noise (bf16, tiny OPT: 3.6% lost at μ=1e-3 and a gradient estimate within 7%
        of float32's; 88% lost at μ=1e-5 and no correlation left), (b) makes the step a
        no-op (bf16 at η=1e-6: 97% of the entries never move). Costs one copy of one
        parameter at a time, on one step; nothing is changed."""
        half = [(i, p) for i, p in enumerate(self.zo_params) if p.dtype in _HALF]
        if not half:
            return
        lr, wd = self.lr("base"), self.optimizer.param_groups[0]["weight_decay"]
        z = self.sampler(terms[0][0])
        total = shift_lost = update_lost = 0
        for i, p in half:
            zi = z(i, p)
            moved = zi != 0
            total += int(moved.sum())
            shift_lost += int((torch.add(p, zi, alpha=self.mu).eq(p) & moved).sum())
            if lr:
                tmp = p.detach().clone()
                zo_update(self.sampler, [tmp], terms, lr, wd, index={id(tmp): i})
                update_lost += int((tmp.eq(p) & moved).sum())
            del zi, moved
        if not total:
            return
        dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for _, p in half}))
        fix = (
            "keep the base weights in float32 (--dtype float32, or load_model(..., "
            "dtype=torch.float32): a checkpoint saved in half precision otherwise loads in "
            "half precision)"
        )
        if shift_lost / total > HALF_LOST_WARN:
            warnings.warn(
                f"the SPSA perturbation mu*z (mu={self.mu:g}) rounds away at "
                f"{shift_lost / total:.0%} of the entries of the {dtypes} base weights: the "
                "zeroth-order gradient estimate is mostly rounding noise; raise mu (--mu, "
                f"e.g. {_suggest_mu(self.mu, shift_lost / total)}) or {fix}",
                RuntimeWarning,
                stacklevel=4,
            )
        if update_lost / total > HALF_LOST_WARN:
            coef = max(abs(c) for _, c in terms)
            warnings.warn(
                f"the zeroth-order update rounds to nothing at {update_lost / total:.0%} of "
                f"the entries of the {dtypes} base weights (step {self.t + 1}: lr_base*|g|/q = "
                f"{lr * coef:.2g}, below half a unit in the last place of most weights): "
                f"the base weights are barely training; {fix}, or raise --lr-base",
                RuntimeWarning,
                stacklevel=4,
            )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step counter, learning rates, seed, z source and noise table (weights are saved
        by the caller)."""
        return {
            "t": self.t,
            "lrs": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "seed": self.seed,
            "z": self.source.name,
            "table": self.sampler.table_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter and rates; a state saved with another z source is refused
        (its trajectory cannot be continued). States without ``z`` predate sources: gaussian.
        The noise table is the saved one (:func:`table_of`: a state from before tables were
        recorded gets the table it ran with), so the run goes on with the same z."""
        saved = state.get("z", "gaussian")
        if self.zo_params and saved != self.source.name:
            raise UsageError(
                f"the saved run perturbs with z={saved!r}, this engine with "
                f"z={self.source.name!r}; resume it with z={saved!r}"
            )
        table = table_of(state, self.zo_params)
        if self.zo_params and self.source.name == "table" and table != self.sampler.table_size:
            self.sampler = make_sampler(self.source, self.seed, self.zo_params, table)
            for g in self.optimizer.param_groups:
                if g.get("zo"):
                    g["sampler"] = self.sampler
        self.t = int(state["t"])
        for g in self.optimizer.param_groups:
            g["lr"] = state["lrs"].get(g["name"], g["lr"])
